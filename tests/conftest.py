"""Shared fixtures: a tiny experiment that runs a full federated round on CPU in seconds."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fedhpc  # noqa: F401  first: it pins torch's CPU kernels (fedhpc.CPU_KERNELS) before any test's torch op

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "rounds=2", "num_clients=8", "data.name=planted", "data.image_size=16", "data.unseen_fraction=0.25",
    "data.planted.samples_per_client=24", "data.planted.num_clusters=2", "data.planted.global_test_size=200",
    "model.kwargs={img_size: 16, patch_size: 4, depth: 2, embed_dim: 32, num_heads: 2}",
    "lora.target_modules=[qkv, fc1]", "train.batch_size=8", "train.clients_per_pass=3",
    "train.eval_batch_size=16",
]


@pytest.fixture
def tiny_overrides(tmp_path):
    return TINY + [f"out_dir={tmp_path}"]


def mpiexec_path() -> str:
    """The venv's MPICH `mpiexec` (or one on PATH). mpich is pinned in requirements.txt and the rank-count
    tests are the suite's second-rank-count references: a missing launcher is a broken install, so it fails."""
    launcher = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if launcher is None:
        pytest.fail("mpiexec not found next to the interpreter or on PATH (pip install -r requirements.txt)")
    return launcher


def mpiexec(n: int, args: list[str], *, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m fedhpc ...` under `mpiexec -n n` from the venv's MPICH."""
    launcher = mpiexec_path()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([launcher, "-n", str(n), sys.executable, "-m", "fedhpc", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)

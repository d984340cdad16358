"""Checkpoints: a resumed run ends exactly where the uninterrupted one does, on any rank count,
after a crash (SIGKILL) or a preemption (SIGTERM), and a corrupt file falls back to an older one."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mpi4py import MPI

from conftest import REPO, TINY, mpiexec_path
from fedhpc.cli import main
from fedhpc.config import load_config
from fedhpc.experiment import run
from fedhpc.io.checkpoint import CheckpointError, find_resumable, verify
from fedhpc.runtime.preempt import PREEMPTED_EXIT_CODE
from fedhpc.strategies import list_strategies
from test_experiment import _close

CONFIG = str(REPO / "configs/quickstart.yaml")
WALL_CLOCK = {"round_seconds", "clients_per_second", "mpi_bytes"}
LONG = ["rounds=4", "strategy.name=fedsa_lora", "strategy.keep_optimizer_state=true"]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _metrics(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k not in WALL_CLOCK} for m in lines]


def _assert_same_run(resumed: Path, reference: Path):
    _close(_summary(resumed), _summary(reference))
    got, want = _metrics(resumed), _metrics(reference)
    assert [m["round"] for m in got] == [m["round"] for m in want]
    for a, b in zip(got, want):
        _close(a, b)
    assert json.loads((resumed / "client_accuracy.json").read_text()) == \
        json.loads((reference / "client_accuracy.json").read_text())


def _global_rng_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def _same_streams(before, after, *, python_random: bool = True) -> bool:
    same = torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    return same and (not python_random or before[2] == after[2])


# HiLoRA keeps no optimizer state (a frozen tier's moments would move it); its resume crosses
# from the root stage (clustering at its end) into the cluster stage.
# FedTreeLoRA keeps none either (the mixing logits have no optimizer slot); its resume crosses the tree's construction.
OPTIONS = {"hilora": ["strategy.root_rounds=1", "strategy.cluster_rounds=1", "strategy.basis_source=update_product"],
           "fedtreelora": ["strategy.warmup_rounds=1"]}

# FedGaLore and fedavg_full keep no optimizer state either (re-seeded from the server every round);
# FedGaLore's resume carries the averaged moments, the shared projector and each client's step count.
OPTIONS.update({"fedgalore": ["strategy.sync=s1", "strategy.sync_first_moment=true", "strategy.bias_correction=global"],
                "fedavg_full": []})
# Fed-HeLLo resumes into a FIM round (round 2) on a 20-sample proxy set (TINY's seen clients hold 114 samples).
OPTIONS.update({"fedhello": ["strategy.fim_samples=20", "strategy.fim_start=2", "strategy.fim_every=1",
                             "strategy.keep_optimizer_state=true"]})


@pytest.mark.parametrize("strategy", list_strategies())
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(strategy, tmp_path):
    keep_state = [] if strategy in OPTIONS else ["strategy.keep_optimizer_state=true"]
    overrides = TINY + [f"strategy.name={strategy}", "checkpoint.keep=2", "sampling.fraction=0.7", *keep_state,
                        *OPTIONS.get(strategy, [])]
    cfg = load_config(CONFIG, overrides + [f"out_dir={tmp_path / 'a'}"])
    before = _global_rng_states()
    run(cfg, comm=MPI.COMM_SELF, progress=False)
    # all randomness is keyed by (seed, client, round): a run draws nothing from global streams. Python's
    # `random` is checked around the resumed run below: a first run's lazy imports (scikit-learn's) may
    # move it at import, so whether it moved here would depend on which tests ran before this one.
    assert _same_streams(before, _global_rng_states(), python_random=False)
    full = tmp_path / "a" / "quickstart"
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["round-000001.h5", "round-000002.h5"]
    # a run that stopped after round 1: its directory as it was then
    part = tmp_path / "b" / "quickstart"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints/round-000001.h5", part / "checkpoints")
    shutil.copy(full / "config.yaml", part)
    path = find_resumable(part, comm=MPI.COMM_SELF)
    before = _global_rng_states()  # everything a run imports is imported by now
    run(load_config(CONFIG, overrides + [f"out_dir={tmp_path / 'b'}"]), comm=MPI.COMM_SELF, progress=False,
        resume=path)
    assert _same_streams(before, _global_rng_states())
    _assert_same_run(part, full)


def test_no_fedhpc_module_uses_pythons_global_random():
    """The order-free half of the check above: no module of the package imports `random` at all."""
    import ast

    users = []
    for path in sorted((REPO / "fedhpc").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            if "random" in names:
                users.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not users, users


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 4-round run the crash and preemption tests must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    run(load_config(CONFIG, TINY + LONG + [f"out_dir={out}", "checkpoint.keep=4"]), comm=MPI.COMM_SELF, progress=False)
    return out / "quickstart"


def _launch(n: int, args: list[str], hold: int = 0) -> subprocess.Popen:
    """`fedhpc` under mpiexec; `hold`: the run waits after that round until a rank is signalled
    (FEDHPC_HOLD_AFTER_ROUND, runtime/preempt.py), so a test interrupts it at a known round."""
    launcher = mpiexec_path()  # fails, not skips, when mpich is missing
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"FEDHPC_HOLD_AFTER_ROUND": str(hold)} if hold else {})}
    return subprocess.Popen([launcher, "-n", str(n), sys.executable, "-m", "fedhpc", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _rank_pid(launcher_pid: int, rank: int) -> int:
    """The process of MPI rank `rank` under this mpiexec (hydra gives each its PMI_RANK)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo, found = [launcher_pid], []
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            try:
                env = (Path("/proc") / str(child) / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"PMI_RANK={rank}".encode() in env and b"fedhpc" in (Path("/proc") / str(child) / "cmdline").read_bytes():
                found.append(child)
    assert len(found) == 1, found
    return found[0]


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_sigkill_of_a_rank_then_resume_on_fewer_ranks(reference, tmp_path):
    args = ["run", CONFIG, *TINY, *LONG, f"out_dir={tmp_path}", "checkpoint.every=1", "--quiet"]
    proc = _launch(4, args, hold=2)  # waits after round 2 (before its checkpoint): the kill always lands mid-run
    ckpts, metrics = tmp_path / "quickstart" / "checkpoints", tmp_path / "quickstart" / "metrics.jsonl"
    _wait_for(lambda: (ckpts / "round-000001.h5").exists() and metrics.read_text().count("\n") >= 2, proc)
    os.kill(_rank_pid(proc.pid, 0), signal.SIGKILL)  # rank 0 is the checkpoint writer: the hardest case
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not (tmp_path / "quickstart" / "summary.json").exists()
    left = sorted(p.name for p in ckpts.iterdir())
    assert left and left[-1] < "round-000004.h5", left  # killed mid-run
    resumed = _launch(2, ["run", "--resume", str(tmp_path / "quickstart"), "--quiet"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert not any(p.suffix == ".tmp" for p in ckpts.iterdir())
    _assert_same_run(tmp_path / "quickstart", reference)
    assert _summary(tmp_path / "quickstart")["ranks"] == 2


def test_sigterm_checkpoints_exits_75_and_resumes_identically(reference, tmp_path):
    args = ["run", CONFIG, *TINY, *LONG, f"out_dir={tmp_path}", "checkpoint.every=0"]
    proc = _launch(2, args, hold=1)  # waits after round 1 until signalled: never finishes first
    metrics = tmp_path / "quickstart" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, proc)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)  # one rank signalled: the ranks agree on it
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    (line,) = [line for line in out.splitlines() if "preempted" in line]
    stopped = int(line.split("after round ")[1].split(";")[0])
    path = tmp_path / "quickstart" / "checkpoints" / f"round-{stopped:06d}.h5"
    assert line == f"fedhpc: preempted after round {stopped}; checkpoint {path}; resume with --resume auto"
    assert stopped == 1 and all(ok for *_, ok in verify(path))
    assert not (tmp_path / "quickstart" / "summary.json").exists()
    # the job script's next attempt: same command, --resume auto, on another rank count
    resumed = subprocess.run([sys.executable, "-m", "fedhpc", *args, "--resume", "auto", "--quiet"], cwd=REPO,
                             capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(tmp_path / "quickstart", reference)


def _flip_byte(path: Path, dataset: str):
    import h5py

    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_offset()
    with open(path, "r+b") as handle:
        handle.seek(offset + 5)
        byte = handle.read(1)
        handle.seek(offset + 5)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_corrupt_or_torn_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, capsys):
    run_dir = tmp_path / "quickstart"
    shutil.copytree(reference, run_dir)
    ckpts = run_dir / "checkpoints"
    _flip_byte(ckpts / "round-000004.h5", "/server/blocks.0.attn.qkv.lora_A")  # bit rot in the newest
    with open(ckpts / "round-000003.h5", "r+b") as handle:                    # a torn copy of the one before
        handle.truncate(os.path.getsize(ckpts / "round-000003.h5") // 2)
    lines = []
    assert find_resumable(run_dir, comm=MPI.COMM_SELF, say=lines.append) == ckpts / "round-000002.h5"
    assert len(lines) == 2 and all(line.count("\n") == 0 for line in lines)
    assert "round-000004.h5: checksum mismatch in /server/blocks.0.attn.qkv.lora_A" in lines[0]
    assert "round-000003.h5: unreadable" in lines[1]
    assert main(["inspect", str(ckpts / "round-000004.h5")]) == 1
    assert "BAD" in capsys.readouterr().out
    with pytest.raises(CheckpointError):
        verify(ckpts / "round-000003.h5")
    assert main(["inspect", str(ckpts / "round-000002.h5")]) == 0
    assert "all checksums ok" in capsys.readouterr().out


def test_resume_refuses_a_changed_config(reference, tmp_path, capsys):
    shutil.copytree(reference, tmp_path / "quickstart")
    args = ["run", CONFIG, *TINY, *LONG, f"out_dir={tmp_path}", "--resume", "auto"]
    assert main(args + ["train.optimizer.lr=0.02"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.optimizer.lr: 0.02 differs from the checkpoint's 0.01" in err
    assert main(["run", "--resume", str(tmp_path / "quickstart"), "lora.r=8"]) == 2
    assert "lora.r: 8 differs from the checkpoint's 4" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "quickstart"), "rounds=3"]) == 2
    assert "rounds: 3 but the checkpoint is at round 4" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err

"""The README's "Writing a method" example runs as written, and does what it says: A averaged
within each true group, B private."""
import re
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from fedhpc.config import ExperimentConfig
from fedhpc.configtree import build
from fedhpc.experiment import run
from fedhpc.strategies import base

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_method_runs_and_shares_a_only_within_groups(tmp_path):
    text = README.read_text()
    code = re.search(r"\*\*Writing a method\.\*\*.*?```python\n(.*?)```", text, re.S).group(1)
    namespace = {"dataclass": __import__("dataclasses").dataclass, "torch": torch, **vars(base)}
    try:
        exec(code, namespace)
        cfg = build(ExperimentConfig, {
            "name": "cluster_a", "num_clients": 6, "rounds": 2, "out_dir": str(tmp_path),
            "data": {"name": "planted", "planted": {"num_clusters": 2, "num_classes": 4, "samples_per_client": 24}},
            "model": {"kwargs": {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2}},
            "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["qkv"]},
            "train": {"batch_size": 8, "clients_per_pass": 4}, "strategy": {"name": "cluster_a"}})
        summary = run(cfg, comm=MPI.COMM_WORLD, progress=False)
    finally:
        base.STRATEGIES.pop("cluster_a", None)
    assert np.isfinite(summary["personalized_mean"]) and summary["global_accuracy"] != summary["global_accuracy"]
    assert summary["bytes_up"] == 2 * 6 * (2 * 16) * 4  # 2 rounds x 6 clients x one qkv A [2, 16], float32

"""End to end: a run writes its directory, and the rank count changes no number in it."""
import json
import math

import pytest
import yaml
from mpi4py import MPI

from fedhpc.config import load_config
from fedhpc.experiment import run

from conftest import REPO, mpiexec

VARIANT = {"ranks", "wall_seconds", "mpi_bytes", "clients_per_second"}


def _close(a: dict, b: dict, rel=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        if key in VARIANT:
            continue
        x, y = a[key], b[key]
        if isinstance(x, float) or isinstance(y, float):
            if x is None or y is None:
                assert x is None and y is None, key
            else:
                assert math.isclose(x, y, rel_tol=rel, abs_tol=1e-12), (key, x, y)
        else:
            assert x == y, (key, x, y)


def test_run_writes_config_metrics_and_summary(tiny_overrides, tmp_path):
    cfg = load_config(REPO / "configs/quickstart.yaml", tiny_overrides + ["name=t"])
    summary = run(cfg, comm=MPI.COMM_SELF, progress=False)
    out = tmp_path / "t"
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [1, 2]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["clients_per_pass"] == 3
    on_disk = json.loads((out / "summary.json").read_text())
    for key in ("global_accuracy", "personalized_mean", "personalized_std", "personalized_p10",
                "unseen_accuracy", "unseen_accuracy_finetuned", "bytes_up", "bytes_down", "wall_seconds"):
        assert on_disk[key] is not None, key
    assert on_disk["bytes_up"] == summary["bytes_up"] > 0
    # 6 seen clients x 2 rounds x adapter bytes (2 blocks x (qkv + fc1) factors + head)
    d, r, classes = 32, 4, 10
    per_client = 2 * (r * d + 3 * d * r + r * d + 4 * d * r) + classes * d + classes
    assert on_disk["bytes_up"] == 6 * 2 * per_client * 4


@pytest.mark.parametrize("strategy", ["fedit", "fedsa_lora", "cluster_fedit"])
def test_rank_count_changes_no_result(strategy, tmp_path):
    summaries = {}
    for n in (1, 2, 4):
        proc = mpiexec(n, ["run", str(REPO / "configs/quickstart.yaml"), *_tiny(tmp_path / f"n{n}"),
                           f"strategy.name={strategy}", "--quiet", "sampling.fraction=0.7", "train.clients_per_pass=2"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        summaries[n] = json.loads((tmp_path / f"n{n}" / "quickstart" / "summary.json").read_text())
        assert summaries[n]["ranks"] == n
    _close(summaries[1], summaries[2])
    _close(summaries[1], summaries[4])


def test_more_ranks_than_clients_is_a_clear_error(tmp_path):
    proc = mpiexec(3, ["run", str(REPO / "configs/quickstart.yaml"), *_tiny(tmp_path), "num_clients=2",
                       "data.unseen_fraction=0.0"])
    assert proc.returncode != 0
    assert "3 MPI ranks but only 2 clients" in proc.stderr


def _tiny(out):
    from conftest import TINY

    return TINY + [f"out_dir={out}"]

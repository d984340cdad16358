"""The benchmarks `make bench` and the README run, at their smallest sizes, end with their tables:
a fresh install once broke them all at import (bench/kernels.py shadowed a dependency's module)."""
import os
import subprocess
import sys

import pytest

from conftest import REPO

SMOKE = {
    "throughput": (["bench/throughput.py", "--quick", "--threads", "1"], "clients/s"),
    "kernel_speed": (["bench/kernel_speed.py", "--quick", "--threads", "1"], "lowrank_aggregate"),
    "precision": (["bench/precision.py", "--regime", "overhead", "--clients", "2", "--repeat", "1", "--threads", "1"],
                  "bf16 speed-up"),
}


@pytest.mark.parametrize("name", list(SMOKE))
def test_bench_script_runs_to_its_table(name, tmp_path):
    args, table_mark = SMOKE[name]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert table_mark in done.stdout, done.stdout[-2000:]

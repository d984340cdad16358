"""Golden runs: every registered method (and the options a refactor is most likely to break) gives
the recorded numbers on 1 rank, and 2, 3 and 4 MPI ranks give the 1-rank run's numbers bit for bit.

The cases are tests/golden/cases.yaml; tests/mpi/golden_runs.py runs them all in one MPI launch
and holds the comparison. The goldens were recorded on one rank with OMP_NUM_THREADS=1 (see that
file's docstring for how to re-record them, only on purpose). Every field of every summary.json,
metrics.jsonl line and client_accuracy.json is compared, except the wall-clock fields and `ranks`
(golden_runs.IGNORED): against the goldens floats within golden_runs.GOLDEN_RTOL (another CPU's
kernels round otherwise), between rank counts on this machine bit for bit. `mpi_bytes` grows with
the rank count by design and is compared with the value recorded for that rank count
(tests/golden/<case>/mpi_bytes.json).
3 ranks give uneven client blocks; 4 ranks leave some ranks a single participant (or none, with
sampling), so every reduction path runs.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(Path(__file__).parent / "mpi"))
import golden_runs  # noqa: E402

RANKS = (1, 2, 3, 4)


def _launcher() -> str:
    found = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if found is None:  # mpich is pinned in requirements.txt: its absence is a broken setup, not a skip
        pytest.fail("mpiexec not found next to the interpreter or on PATH (pip install -r requirements.txt)")
    return found


RECORDED_METHODS = {"cluster_fedit", "fedex_lora", "fedit", "fedsa_lora", "ffa_lora", "flexlora", "flora", "hetlora",
                    "hilora", "ilora", "local", "lora_fair"}
"""Every method registered when the goldens were recorded (b1bbef8); a method added later has no golden."""


def test_every_recorded_method_is_still_registered_and_has_a_golden_case():
    from fedhpc.strategies import list_strategies

    _, cases = golden_runs.load_cases()
    covered = {o.split("=", 1)[1].strip() for overrides in cases.values() for o in overrides
               if o.startswith("strategy.name=")}
    assert RECORDED_METHODS <= covered, f"methods without a golden case: {RECORDED_METHODS - covered}"
    assert RECORDED_METHODS <= set(list_strategies()), f"no longer registered: {RECORDED_METHODS - set(list_strategies())}"
    for case in cases:
        for name in (*golden_runs.FILES, golden_runs.MPI_BYTES):
            assert (golden_runs.GOLDEN / case / name).is_file(), f"{case}: golden {name} not recorded"


def _golden_runs(ranks: int, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([_launcher(), "-n", str(ranks), sys.executable, golden_runs.__file__, "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, f"golden runs failed on {ranks} rank(s):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("golden-1-rank")
    _golden_runs(1, out)
    return out


def test_one_rank_gives_the_recorded_numbers(one_rank):
    problems = golden_runs.compare_all(golden_runs.GOLDEN, one_rank, ranks=1, rtol=golden_runs.GOLDEN_RTOL)
    assert not problems, f"{len(problems)} difference(s) from tests/golden on 1 rank:\n" + "\n".join(problems)


@pytest.mark.parametrize("ranks", RANKS[1:])
def test_more_ranks_give_the_one_rank_numbers_bit_for_bit(ranks, one_rank, tmp_path):
    _golden_runs(ranks, tmp_path)
    problems = golden_runs.compare_all(one_rank, tmp_path, ranks=ranks)
    assert not problems, f"{len(problems)} difference(s) from the 1-rank run on {ranks} ranks:\n" + "\n".join(problems)


def test_the_comparison_takes_floats_to_rtol_and_everything_else_exactly():
    """Cases written by hand: the tolerance covers rounding only, and types, ints and None stay exact."""
    same = golden_runs._same
    assert same(2.0, 2.0 * (1 + 0.5 * golden_runs.GOLDEN_RTOL), golden_runs.GOLDEN_RTOL)
    assert not same(2.0, 2.0 * (1 + 2 * golden_runs.GOLDEN_RTOL), golden_runs.GOLDEN_RTOL)
    assert not same(2.0, 2.0 + 1e-15) and not same(0.0, -0.0) and same(0.0, 0.0)
    assert not same(3, 4, 0.5) and not same(3, 3.0, 0.5) and not same(None, 0.0, 0.5)
    assert same({"a": [1.0, None]}, {"a": [1.0 + 1e-9, None]}, 1e-6) and not same({"a": [1.0]}, {"a": [1.0, 2.0]}, 1.0)

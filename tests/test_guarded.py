"""`fedhpc run` and `fedhpc sweep` under mpiexec share one guard (cli._guarded): an exception that one
rank raises alone aborts every rank instead of leaving the others waiting in a collective."""
import json
import subprocess

import pytest

from conftest import REPO, TINY, mpiexec, mpiexec_path

HANG = 120
"""Seconds after which a 2-rank job that one rank failed counts as hung (it ends in ~10 s)."""
CONFIG = str(REPO / "configs" / "quickstart.yaml")


def _sweep(tmp_path) -> list[str]:
    """Rank 0 alone takes a point's lock (`.<point>.lock` beside its run directory); here that path is
    a folder, so rank 0 raises IsADirectoryError while rank 1 waits for the lock's outcome (a broadcast)."""
    sweep = tmp_path / "s.yaml"
    sweep.write_text(json.dumps({  # JSON is YAML
        "name": "t", "out_dir": str(tmp_path / "runs"), "base": CONFIG, "overrides": [*TINY, "rounds=1"],
        "methods": {"fedit": ["strategy.name=fedit"]}, "seeds": [0]}))
    (tmp_path / "runs" / "t" / "fedit" / ".base_s0.lock").mkdir(parents=True)
    return ["sweep", str(sweep)]


def _run(tmp_path) -> list[str]:
    """Rank 0 alone writes the run directory; its metrics.jsonl is a folder here, so rank 0 raises
    IsADirectoryError at the start while rank 1 goes on to the round's first collective."""
    (tmp_path / "quickstart" / "metrics.jsonl").mkdir(parents=True)
    return ["run", CONFIG, *TINY, "rounds=1", f"out_dir={tmp_path}", "--quiet"]


@pytest.mark.parametrize("command", [_sweep, _run], ids=["sweep", "run"])
def test_a_rank_failing_alone_aborts_every_rank(tmp_path, command):
    """Without the abort (or with an OSError that escapes it), rank 1 waits forever and mpiexec never returns."""
    try:
        proc = mpiexec(2, command(tmp_path), timeout=HANG)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a 2-rank {command.__name__[1:]} with one failing rank still ran after {HANG} s: the other "
                    f"rank hangs")
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "IsADirectoryError" in proc.stderr, proc.stderr[-3000:]
    assert not list(tmp_path.rglob("summary.json"))


def test_abort_waits_until_the_launcher_has_read_the_traceback(tmp_path):
    """cli._abort calls MPI_Abort only once stderr's pipe is empty: a child writes 32 KiB to stderr that
    nobody reads for 0.5 s; its (fake) Abort must find nothing unread. Without the wait mpiexec lost the
    traceback of 4 aborts in 30 here."""
    import sys
    import time

    child = (
        "import array, fcntl, sys, termios\n"
        "from fedhpc import cli\n"
        "class Comm:\n"
        "    def Abort(self, code):\n"
        "        unread = array.array('i', [0]); fcntl.ioctl(2, termios.FIONREAD, unread)\n"
        f"        open({str(tmp_path / 'abort')!r}, 'w').write(f'{{code}} {{unread[0]}}')\n"
        "sys.stderr.write('x' * 32768)\n"
        "cli._abort(Comm(), 3)\n")
    proc = subprocess.Popen([sys.executable, "-c", child], stderr=subprocess.PIPE, cwd=REPO)
    time.sleep(0.5)
    assert not (tmp_path / "abort").exists(), "Abort came before anyone read the pipe"
    assert len(proc.stderr.read()) == 32768
    proc.wait(timeout=60)
    assert (tmp_path / "abort").read_text() == "3 0"


def _guard_script(raising_ranks: str) -> list[str]:
    """A body that raises ValueError (an expected error of `fedhpc run`) on `raising_ranks`, while
    the other ranks go on to a collective."""
    return ["-c", (
        "import sys\n"
        "from fedhpc import cli\n"
        "cli.AGREE_S = 3.0\n"
        "def body(comm, guard):\n"
        f"    if comm.Get_rank() in {raising_ranks}:\n"
        "        raise ValueError(f'bad thing on rank {comm.Get_rank()}')\n"
        "    comm.allreduce(1)\n"
        "    return 0\n"
        "sys.exit(cli._on_every_rank(body, None, expected=lambda: (ValueError,), preempted=''))\n")]


def _mpiexec_script(n: int, raising_ranks: str) -> subprocess.CompletedProcess:
    import os
    import sys

    return subprocess.run([mpiexec_path(), "-n", str(n), sys.executable, *_guard_script(raising_ranks)],
                          capture_output=True, text=True, timeout=HANG, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_an_expected_error_on_every_rank_is_one_line_and_exit_2():
    proc = _mpiexec_script(3, "(0, 1, 2)")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == ["fedhpc: error: bad thing on rank 0"], proc.stderr[-2000:]


def test_an_expected_error_on_one_rank_alone_is_said_by_it_and_aborts_the_others():
    """Before, only rank 0 spoke and nobody aborted: rank 1 raised alone, rank 0 waited in allreduce forever."""
    try:
        proc = _mpiexec_script(3, "(1,)")
    except subprocess.TimeoutExpired:
        pytest.fail(f"an expected error on rank 1 alone still ran after {HANG} s")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "fedhpc: error: on rank 1, not on every rank: bad thing on rank 1" in proc.stderr.splitlines()

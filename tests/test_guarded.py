"""`fedhpc run` and `fedhpc sweep` under mpiexec share one guard (cli._guarded): an exception that one
rank raises alone aborts every rank instead of leaving the others waiting in a collective."""
import json
import subprocess

import pytest

from conftest import REPO, TINY, mpiexec

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

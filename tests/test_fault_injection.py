"""Fault injection (marker `faults`): crashes at random points, corrupt files, a full disk.

- SIGKILL of a random rank at a random point of a run (a random round, a random delay into it:
  start-up, training, a background checkpoint write), then `--resume auto` on another rank count:
  the summary and every metrics line equal the uninterrupted run's. FEDHPC_FAULT_TRIALS trials
  (default 3, as CI runs them; run >= 20 locally: FEDHPC_FAULT_TRIALS=20 pytest -m faults).
- SIGKILL of the writer while a checkpoint is being written (after HDF5 laid it out, among its
  rows, just before the rename that publishes it): the previous checkpoint is used.
- One flipped bit anywhere in a checkpoint (data, HDF5 metadata, the user block), or a file cut
  short anywhere: caught by its checksums, one line names the file, the previous one is used.
- A full disk while a checkpoint is written (an injected ENOSPC; and a real 1-file-too-small
  tmpfs where this process may mount one): one warning line naming the checkpoint not written and
  the one kept, no half-written file left, the run goes on; the run directory itself unwritable:
  one line, exit 74.

The reference is the uninterrupted in-process run (tests/test_checkpoint.py's fixture).
"""
import errno
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
from mpi4py import MPI

from conftest import REPO, TINY
from fedhpc.cli import main
from fedhpc.config import load_config
from fedhpc.experiment import run
from fedhpc.io.checkpoint import CheckpointError, find_resumable, verify
from test_checkpoint import CONFIG, LONG, _assert_same_run, _launch, _rank_pid, reference  # noqa: F401

pytestmark = pytest.mark.faults

TRIALS = int(os.environ.get("FEDHPC_FAULT_TRIALS", "3"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _args(out: Path) -> list[str]:
    return ["run", CONFIG, *TINY, *LONG, f"out_dir={out}", "checkpoint.every=1", "--quiet"]


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


@pytest.mark.parametrize("trial", range(TRIALS))
def test_sigkill_of_a_random_rank_at_a_random_time_then_resume_elsewhere(trial, reference, tmp_path):
    rng = random.Random(trial)
    ranks = rng.choice([2, 3, 4])
    victim, after = rng.randrange(ranks), rng.choice([n for n in (1, 2, 3) if n != ranks])
    rounds_done, delay = rng.randrange(4), rng.uniform(0.0, 1.5)  # kill `delay` s after that many rounds
    run_dir = tmp_path / "quickstart"
    proc = _launch(ranks, _args(tmp_path))
    deadline = time.monotonic() + 300
    while _lines(run_dir / "metrics.jsonl") < rounds_done and proc.poll() is None:
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    time.sleep(delay)
    killed = False
    if proc.poll() is None:
        try:
            os.kill(_rank_pid(proc.pid, victim), signal.SIGKILL)
            killed = True
        except (AssertionError, ProcessLookupError):  # it was just exiting
            pass
    proc.communicate(timeout=120)
    what = (f"trial {trial}: {ranks} ranks, rank {victim} killed {delay:.2f} s after round {rounds_done} "
            f"({'killed' if killed else 'had finished'}), resumed on {after}")
    print(what)
    resumed = _launch(after, _args(tmp_path)[:-1] + ["--resume", "auto", "--quiet"])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, f"{what}\n{err[-3000:]}"
    assert not any(p.suffix == ".tmp" for p in (run_dir / "checkpoints").iterdir()), what
    _assert_same_run(run_dir, reference)


CHILD = r"""
import os, signal, sys
from fedhpc.io.checkpoint import writer
point, target = sys.argv[1], sys.argv[2]
real_lay_out, real_pwrite, real_replace = writer.lay_out, os.pwrite, os.replace
writes = [0]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def lay_out(path, snap):
    rows = real_lay_out(path, snap)
    if point == "layout" and path.name == target + ".tmp":
        die()
    return rows

def pwrite(fd, data, offset):
    done = real_pwrite(fd, data, offset)
    if point == "rows" and os.readlink(f"/proc/self/fd/{fd}").endswith(target + ".tmp"):
        writes[0] += 1
        if writes[0] == 5:
            die()
    return done

def replace(src, dst):
    if point == "rename" and str(dst).endswith(target):
        die()
    return real_replace(src, dst)

writer.lay_out, os.pwrite, os.replace = lay_out, pwrite, replace
from fedhpc.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("point", ["layout", "rows", "rename"])
def test_sigkill_while_a_checkpoint_is_written_falls_back_to_the_previous_one(point, reference, tmp_path):
    """The writer dies while round 3's file is written: HDF5 has laid it out, some rows are in, or
    it is complete but not yet renamed. Only `<file>.tmp` is left; the run resumes from round 2."""
    ckpts = tmp_path / "quickstart" / "checkpoints"
    proc = subprocess.run([sys.executable, "-c", CHILD, point, "round-000003.h5", *_args(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert sorted(p.name for p in ckpts.iterdir()) == ["round-000001.h5", "round-000002.h5", "round-000003.h5.tmp"]
    lines = []
    assert find_resumable(tmp_path / "quickstart", comm=MPI.COMM_SELF, say=lines.append) == ckpts / "round-000002.h5"
    assert lines == []  # a .tmp is never a candidate
    resumed = subprocess.run([sys.executable, "-m", "fedhpc", *_args(tmp_path)[:-1], "--resume", "auto"], cwd=REPO,
                             capture_output=True, text=True, timeout=300, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpts / 'round-000002.h5'} (round 2 of 4)" in resumed.stdout
    assert not any(p.suffix == ".tmp" for p in ckpts.iterdir())
    _assert_same_run(tmp_path / "quickstart", reference)


def _damaged_copy(reference: Path, tmp_path: Path, damage) -> tuple[Path, list[str]]:
    """The reference run directory with its newest checkpoint damaged; what find_resumable said."""
    run_dir = tmp_path / "quickstart"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(reference, run_dir)
    damage(run_dir / "checkpoints" / "round-000004.h5")
    lines = []
    found = find_resumable(run_dir, comm=MPI.COMM_SELF, say=lines.append)
    assert found == run_dir / "checkpoints" / "round-000003.h5", lines
    return run_dir, lines


def test_one_flipped_bit_anywhere_is_caught(reference, tmp_path):
    """Bits drawn over the whole file (user block, HDF5 metadata, every dataset); and the bits of
    the `round` attribute, which no dataset checksum covers."""
    import h5py

    newest = reference / "checkpoints" / "round-000004.h5"
    size = newest.stat().st_size
    rng = np.random.default_rng(0)
    positions = [int(p) for p in rng.integers(0, size * 8, 40 * TRIALS)]
    positions += [int(p) * 8 + b for p in rng.integers(0, 512, 5) for b in (0, 5)]  # the user block
    with h5py.File(newest, "r") as f:  # where HDF5 keeps the attribute holding the round number
        raw = newest.read_bytes()
        at = raw.find(np.int64(f.attrs["round"]).tobytes(), 512)
    positions += [at * 8 + b for b in range(3)]
    for bit in positions:
        def flip(path, bit=bit):
            data = bytearray(path.read_bytes())
            data[bit // 8] ^= 1 << (bit % 8)
            path.write_bytes(bytes(data))

        _, lines = _damaged_copy(reference, tmp_path, flip)
        assert len(lines) == 1 and "round-000004.h5" in lines[0] and "\n" not in lines[0], (bit, lines)
        assert ("checksum mismatch" in lines[0] or "unreadable" in lines[0]), (bit, lines)
        assert lines[0].endswith("falling back to the previous one"), lines


def test_a_checkpoint_cut_short_anywhere_is_caught(reference, tmp_path, capsys):
    newest = reference / "checkpoints" / "round-000004.h5"
    size = newest.stat().st_size
    for cut in [0, 100, 511, 512, 513, size // 2, size - 1, *np.random.default_rng(1).integers(1, size, 5 * TRIALS)]:
        def truncate(path, cut=int(cut)):
            with open(path, "r+b") as handle:
                handle.truncate(cut)

        run_dir, lines = _damaged_copy(reference, tmp_path, truncate)
        assert len(lines) == 1 and "round-000004.h5" in lines[0], (cut, lines)
    with pytest.raises(CheckpointError, match="unreadable"):
        verify(run_dir / "checkpoints" / "round-000004.h5")
    assert main(["inspect", str(run_dir / "checkpoints" / "round-000004.h5")]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_a_metadata_flip_is_named_as_such(reference, tmp_path, capsys):
    """A bit of the `round` attribute: every dataset's CRC holds, the whole-file CRC does not."""
    import h5py

    def flip_round(path):
        with h5py.File(path, "r") as f:
            value = np.int64(f.attrs["round"]).tobytes()
        data = bytearray(path.read_bytes())
        at = data.find(value, 512)
        data[at] ^= 0x02  # round 4 -> 6: what a resume would believe without the whole-file CRC
        path.write_bytes(bytes(data))

    run_dir, lines = _damaged_copy(reference, tmp_path, flip_round)
    assert lines[0].endswith("round-000004.h5: checksum mismatch in the file's metadata (whole-file CRC-32); "
                             "falling back to the previous one"), lines
    assert main(["inspect", str(run_dir / "checkpoints" / "round-000004.h5")]) == 1
    out = capsys.readouterr().out
    assert "checksum MISMATCH in 1: (whole file)" in out


def _fail_writes_to(monkeypatch, name: str, error: int = errno.ENOSPC):
    """os.pwrite raises `error` for the file `name` (a checkpoint's .tmp)."""
    real = os.pwrite

    def pwrite(fd, data, offset):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(name):
            raise OSError(error, os.strerror(error))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(reference, tmp_path, monkeypatch, capsys):
    _fail_writes_to(monkeypatch, "round-000003.h5.tmp")
    cfg = load_config(CONFIG, TINY + LONG + [f"out_dir={tmp_path}", "checkpoint.every=1"])
    run(cfg, comm=MPI.COMM_WORLD, progress=False)
    out = capsys.readouterr().out
    assert out.splitlines() == ["fedhpc: warning: checkpoint round-000003.h5 not written (OSError: [Errno 28] No "
                                "space left on device); the previous checkpoint round-000002.h5 is kept"]
    ckpts = tmp_path / "quickstart" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["round-000002.h5", "round-000004.h5"]  # the run went on
    _assert_same_run(tmp_path / "quickstart", reference)


def test_disk_full_while_writing_the_run_directory_is_one_line_and_exit_74(tmp_path, monkeypatch, capsys):
    from fedhpc.io import run_dir

    real = run_dir.RunDir.log_round

    def log_round(self, metrics):
        if metrics["round"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path / "metrics.jsonl"))
        return real(self, metrics)

    monkeypatch.setattr(run_dir.RunDir, "log_round", log_round)
    assert main(["run", CONFIG, *TINY, f"out_dir={tmp_path}", "--quiet"]) == 74
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedhpc: error: disk full: [Errno 28] No space left on device")


@pytest.fixture
def small_disk(tmp_path, reference):
    """A tmpfs that holds the run directory with two checkpoints but not a third (root only)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    one = (reference / "checkpoints" / "round-000004.h5").stat().st_size
    size = (2 * one + one // 2 + (64 << 10)) // 4096 * 4096  # 2.5 checkpoints + 64 KiB for the rest
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC test covers the same path")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_real_full_disk_keeps_complete_checkpoints_only(small_disk, reference):
    proc = subprocess.run([sys.executable, "-m", "fedhpc", *_args(small_disk)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stdout.splitlines() if "warning" in line]
    assert len(warnings) == 2 and all("No space left on device" in w for w in warnings), proc.stdout
    assert warnings[0].startswith("fedhpc: warning: checkpoint round-000003.h5 not written")
    assert warnings[0].endswith("the previous checkpoint round-000002.h5 is kept")
    ckpts = small_disk / "quickstart" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["round-000001.h5", "round-000002.h5"]
    assert all(all(ok for *_, ok in verify(p)) for p in ckpts.iterdir())
    _assert_same_run(small_disk / "quickstart", reference)

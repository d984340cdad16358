"""Writing checkpoints: gathered to rank 0, written on a background thread, complete or absent.

PyPI h5py has no MPI driver, so the ranks gather their client rows to rank 0 (one Gatherv per
tensor, over MPI, which is far faster than the disk), and rank 0 hands that snapshot to a
background thread which writes `<file>.tmp`, fsyncs it, renames it into place and fsyncs the
directory: a checkpoint is complete or absent, and the round loop waits only for the gather.
One self-contained file per round moves and copies like any file, opens in `h5dump` with no
virtual-dataset source paths to resolve, and becomes visible with a single rename, where
per-rank shards joined by a virtual dataset would need a cross-rank protocol to know when every
shard is durable. The price is one copy of all client state in rank 0's memory while a write is
in flight (the same bytes the file holds). Only once a new file is in place are the ones beyond
the newest `checkpoint.keep` deleted.
"""
from __future__ import annotations

import datetime
import os
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from ..run_dir import json_line
from .format import Snapshot, _file_name, _to_numpy, checkpoint_dir, lay_out, seal

__all__ = ["CheckpointConfig", "Checkpointer", "write_checkpoint"]


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 1
    """Write a checkpoint every this many rounds, and always after the last one (0: only when
    preempted by SIGTERM / SIGUSR1)."""
    keep: int = 2
    """Checkpoints kept on disk; older ones are deleted once a newer one is complete."""
    background: bool = True
    """Write on a background thread (the round loop waits only for the gather to rank 0)."""
    gather_limit_mb: float = 1024.0
    """Client rows (all ranks, clients + optimizer) up to this many MiB are gathered to rank 0 and
    written in the background; above it, or from a paged store (`store.memory_cap_mb`), they stream
    to rank 0 in chunks (stream.py: the same file, no rank holding more than a chunk of other ranks'
    rows; the loop waits for the write). 0: always stream."""
    chunk_mb: float = 64.0
    """Rows per message of a streamed checkpoint, in MiB."""

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"every must be >= 0, got {self.every}")
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1, got {self.keep}")
        if self.gather_limit_mb < 0:
            raise ValueError(f"gather_limit_mb must be >= 0 (0: always stream), got {self.gather_limit_mb}")
        if self.chunk_mb <= 0:
            raise ValueError(f"chunk_mb must be > 0, got {self.chunk_mb}")


def write_checkpoint(path: Path, snap: Snapshot) -> None:
    """Write `snap` to `path` atomically: `<path>.tmp`, fsync, rename, fsync the directory.

    h5py lays out the file and allocates every client chunk up front (`lay_out`); the chunks'
    bytes then go in with plain `os.pwrite` calls, which release the GIL (HDF5 calls do not), so
    a background write does not stall the round loop's Python thread.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        rows = lay_out(tmp, snap)
        known = []  # (offset, length, CRC-32) of each row written: the seal does not read them back
        fd = os.open(tmp, os.O_WRONLY)
        try:
            for offset, row in rows:
                row = np.ascontiguousarray(row)
                os.pwrite(fd, row, offset)
                known.append((offset, row.nbytes, zlib.crc32(row)))
        finally:
            os.close(fd)
        seal(tmp, known)  # the whole-file checksum, once every byte is in
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:  # disk full, ...: no half-written file is left behind (nor its space taken)
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _gather_rows(t: torch.Tensor, rows_per_rank: list[int] | None, *, comm) -> tuple[np.ndarray, str] | None:
    """Every rank's rows of a client tensor, concatenated in rank (= client) order on rank 0."""
    from mpi4py import MPI

    array, name = _to_numpy(t)
    if comm.Get_rank() != 0:
        comm.Gatherv(array, None, root=0)
        return None
    row = int(np.prod(array.shape[1:]))
    counts = np.array(rows_per_rank) * row
    out = np.empty((sum(rows_per_rank), *array.shape[1:]), dtype=array.dtype)
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
    comm.Gatherv(array, [out, counts, displs, MPI._typedict[array.dtype.char]], root=0)
    return out, name


class Checkpointer:
    """Writes a run's checkpoints: gathered on the loop's thread, written on a background one."""

    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, *, comm, rounds: int, config: dict,
                 num_clients: int, fresh: bool):
        """`fresh`: a new run, so checkpoints an earlier run of this name left behind are deleted
        (kept, they would mix with this run's and be resumed from)."""
        self.cfg = cfg
        self.num_clients = num_clients
        self.comm = comm
        self.rounds = rounds
        self.config = yaml.safe_dump(config, sort_keys=False)
        self.strategy = config["strategy"]["name"]
        self.folder = checkpoint_dir(run_dir)
        self.is_writer = comm.Get_rank() == 0
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.blocked_seconds: list[float] = []
        """Time the round loop spent in each `save` (for bench/checkpoint.py) ..."""
        self.waited_seconds: list[float] = []
        """... of which waiting for the previous write to finish (rank 0)."""
        self.latest: Path | None = None
        """The newest checkpoint known to be on disk (rank 0: after `wait`)."""
        self.failed = 0
        """Checkpoint writes that failed (rank 0)."""
        self.pending: Path | None = None
        if self.is_writer:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob("*.tmp"):  # left by a writer that was killed
                stale.unlink()
            earlier = sorted(self.folder.glob("round-*.h5")) if fresh else []
            for old in earlier:
                old.unlink()
            if earlier:
                print(f"fedhpc: starting afresh: deleted {len(earlier)} checkpoint(s) of an earlier run in "
                      f"{self.folder} (--resume auto continues a run instead)", flush=True)

    def due(self, round_index: int) -> bool:
        every = self.cfg.every
        return every > 0 and (round_index % every == 0 or round_index == self.rounds)

    def save(self, round_index: int, *, server: dict, clients: dict, optimizer: dict | None, totals: dict,
             metrics: list[dict], wall_seconds: float, wait: bool = False) -> Path:
        """Collective: snapshot this round and write it (in the background unless `wait`).
        `clients` / `optimizer`: stacked tensors, or RowSources (a paged store), which stream."""
        t0 = time.perf_counter()
        if self._streams(clients, optimizer):
            return self._save_streamed(round_index, server=server, clients=clients, optimizer=optimizer,
                                       totals=totals, metrics=metrics, wall_seconds=wall_seconds, t0=t0)
        tensors = {"clients": {}, "optimizer": {}}
        hosted = next(iter({**clients, **(optimizer or {})}.values()), torch.zeros(0)).shape[0]
        rows_per_rank = self.comm.gather(hosted, root=0)
        for group, values in (("clients", clients), ("optimizer", optimizer or {})):
            for key in sorted(values):
                tensors[group][key] = _gather_rows(values[key], rows_per_rank, comm=self.comm)
        path = self.folder / _file_name(round_index)
        if self.is_writer:
            tensors["server"] = {key: _to_numpy(v.clone()) for key, v in sorted(server.items())}
            if optimizer is None:
                del tensors["optimizer"]
            attrs = {"rounds": self.rounds, "num_clients": self.num_clients, "strategy": self.strategy,
                     "wall_seconds": wall_seconds, "created": datetime.datetime.now().isoformat(timespec="seconds"),
                     **{k: int(v) for k, v in totals.items()}}
            snap = Snapshot(round_index, attrs, self.config, "".join(json_line(m) for m in metrics), tensors)
            t_wait = time.perf_counter()
            self.wait()  # one write in flight at a time: a slow disk slows the loop, never corrupts it
            self.waited_seconds.append(time.perf_counter() - t_wait)
            self.pending = path
            self.thread = threading.Thread(target=self._write, args=(path, snap), name="fedhpc-checkpoint")
            self.thread.start()
            if wait or not self.cfg.background:
                self.wait()
        self.blocked_seconds.append(time.perf_counter() - t0)
        return path

    def _streams(self, clients, optimizer) -> bool:
        """Whether this checkpoint streams (the same answer on every rank)."""
        groups = [g for g in (clients, optimizer) if g is not None]
        paged = any(not isinstance(g, dict) for g in groups)
        local = sum(v.numel() * v.element_size() for g in groups if isinstance(g, dict) for v in g.values())
        total = sum(self.comm.allgather(local)) if self.comm.Get_size() > 1 else local
        return bool(self.comm.allreduce(int(paged))) or total > self.cfg.gather_limit_mb * (1 << 20)

    def _save_streamed(self, round_index: int, *, server, clients, optimizer, totals, metrics, wall_seconds,
                       t0: float) -> Path:
        from ...store import TensorRows
        from .stream import write_streamed

        self.wait()  # a gathered write still in flight finishes first
        path = self.folder / _file_name(round_index)
        sources = {"clients": clients if not isinstance(clients, dict) else TensorRows(clients)}
        if optimizer is not None:
            sources["optimizer"] = optimizer if not isinstance(optimizer, dict) else TensorRows(optimizer)
        snap = None
        if self.is_writer:
            attrs = {"rounds": self.rounds, "num_clients": self.num_clients, "strategy": self.strategy,
                     "wall_seconds": wall_seconds, "created": datetime.datetime.now().isoformat(timespec="seconds"),
                     **{k: int(v) for k, v in totals.items()}}
            snap = Snapshot(round_index, attrs, self.config, "".join(json_line(m) for m in metrics),
                            {"server": {key: _to_numpy(v.clone()) for key, v in sorted(server.items())}})
        try:
            write_streamed(path, snap, sources, comm=self.comm, chunk_bytes=int(self.cfg.chunk_mb * (1 << 20)))
            if self.is_writer:
                for old in sorted(self.folder.glob("round-*.h5"))[:-self.cfg.keep]:
                    old.unlink()
                self.latest = path
        except OSError as err:  # disk full, ...: the previous checkpoints are still there
            self._report(path, err)
        self.blocked_seconds.append(time.perf_counter() - t0)
        return path

    def _write(self, path: Path, snap: Snapshot) -> None:
        try:
            write_checkpoint(path, snap)
            kept = sorted(self.folder.glob("round-*.h5"))
            for old in kept[:-self.cfg.keep]:
                old.unlink()
        except BaseException as err:  # reported by wait(), on the loop's thread
            self.error = err

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; a failed write is reported in
        one line and the run goes on (the previous checkpoints are still there)."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
            if self.error is None:
                self.latest = self.pending
        if self.error is not None:
            err, self.error = self.error, None
            self._report(self.pending, err)

    def _report(self, path: Path, err: BaseException) -> None:
        """One line: which checkpoint was not written, why, and which one is kept."""
        self.failed += 1
        kept = sorted(self.folder.glob("round-*.h5"))
        print(f"fedhpc: warning: checkpoint {path.name} not written ({type(err).__name__}: {err}); "
              + (f"the previous checkpoint {kept[-1].name} is kept" if kept else "no earlier checkpoint exists"),
              flush=True)

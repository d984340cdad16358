"""Streamed checkpoints: the same file as a gathered one, written with no rank holding more than a
bounded chunk of other ranks' rows.

Rank 0 lays the file out (every client chunk allocated, none filled), then the ranks take turns
in rank (= client) order: each reads its rows from its store `chunk_bytes` at a time (a paged
store reads them from its file), one chunk ahead on a thread, and sends the chunk to rank 0, which
`pwrite`s it into place straight from the received buffer and takes the CRC-32 of each run of
adjacent chunks it writes (combined into each dataset's CRC, and kept for the whole-file one).
When every row is in, rank 0 writes the CRC attributes, seals the file (the whole-file CRC reads
back only HDF5's metadata between the runs: `seal(known=...)`), fsyncs, renames `<file>.tmp` into
place and fsyncs the directory: as with a gathered checkpoint, a file is complete or absent, and a
reader (resume, `fedhpc inspect`, `fedhpc export`) cannot tell the two apart.

Unlike a gathered write, a streamed one runs on the round loop's thread (every rank takes part);
the loop waits for it. Memory: rank 0 holds one chunk of another rank's rows and two of its own
(the one written, the one read ahead), every other rank two chunks of its own.
"""
from __future__ import annotations

import errno
import os
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from .format import (FORMAT, FORMAT_VERSION, USERBLOCK, Snapshot, _allocated_per_client, _crc, _to_numpy,
                     chunk_offsets, crc32_combine, seal)

__all__ = ["write_streamed"]

TAG = 7213


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype(np.uint16) if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype


def _lay_out(path: Path, snap: Snapshot, specs: dict) -> dict:
    """The file with everything but the client rows; returns group -> key -> per-row byte offsets."""
    import h5py

    offsets = {}
    with h5py.File(path, "w", userblock_size=USERBLOCK) as f:
        f.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "round": snap.round, **snap.attrs})
        for name, text in (("config", snap.config), ("metrics", snap.metrics)):
            ds = f.create_dataset(name, data=text, dtype=h5py.string_dtype())
            ds.attrs["crc32"] = _crc(text)
        g = f.create_group("server")
        for key, (array, dtype_name) in snap.tensors["server"].items():
            ds = g.create_dataset(key, data=array)
            ds.attrs.update({"crc32": _crc(array), "torch_dtype": dtype_name})
        for group, spec in specs.items():
            g = f.create_group(group)
            offsets[group] = {}
            for key, (shape, dtype) in spec.items():
                if "/" in key:
                    raise ValueError(f"checkpoint: tensor key {key!r} must not contain '/'")
                like = np.empty((0,), dtype=_np_dtype(dtype))
                name = str(dtype).removeprefix("torch.")
                if shape[0] == 0 or 0 in shape:
                    ds = g.create_dataset(key, data=np.zeros(shape, like.dtype))
                    ds.attrs.update({"crc32": _crc(np.zeros(shape, like.dtype)), "torch_dtype": name})
                    continue
                ds = _allocated_per_client(g, key, SimpleNamespace(shape=shape, dtype=like.dtype))
                ds.attrs["torch_dtype"] = name
                offsets[group][key] = chunk_offsets(ds)
    return offsets


def _pwrite_rows(fd: int, offsets: np.ndarray, data: np.ndarray, runs: list) -> int:
    """Rows `data` at `offsets` (one per row), each run of adjacent chunks in one call straight
    from `data`'s memory; appends (offset, bytes, CRC-32) of each run to `runs` (for the
    whole-file checksum, `seal(known=...)`) and returns the CRC-32 of all of `data`'s bytes."""
    rows = data.reshape(len(offsets), -1).view(np.uint8)
    size = rows.shape[1]
    gaps = np.flatnonzero(np.diff(offsets) != size) + 1
    crc = 0
    for start, stop in zip([0, *gaps], [*gaps, len(offsets)]):
        run = rows[start:stop]
        at, left = int(offsets[start]), memoryview(run).cast("B")
        while len(left):  # pwrite may write less than asked
            done = os.pwrite(fd, left, at)
            if done <= 0:
                raise OSError(errno.ENOSPC, "no progress writing a checkpoint")
            at, left = at + done, left[done:]
        part = zlib.crc32(run)
        runs.append((int(offsets[start]), run.nbytes, part))
        crc = crc32_combine(crc, part, run.nbytes)
    return crc


def _write_chunk(fd, g, keys, arrays, offsets, crcs, runs, lo: int, hi: int) -> None:
    for k, a in zip(keys, arrays):
        if k in offsets[g]:
            a = np.ascontiguousarray(a)
            crcs[g][k] = crc32_combine(crcs[g][k], _pwrite_rows(fd, offsets[g][k][lo:hi], a, runs), a.nbytes)


def write_streamed(path: Path, snap: Snapshot, sources: dict, *, comm, chunk_bytes: int = 64 << 20,
                   on_tmp_written=None) -> None:
    """Collective: write checkpoint `path` from `snap` (server tensors, attrs, text; rank 0's is
    used) and each rank's RowSource per group in `sources` (the same groups and specs on every
    rank), streamed to rank 0 in chunks of at most `chunk_bytes` of rows."""
    rank, size = comm.Get_rank(), comm.Get_size()
    groups = sorted(sources)
    counts = comm.allgather({g: sources[g].count for g in groups})
    specs = {g: {k: sources[g].spec[k] for k in sorted(sources[g].spec)} for g in groups}
    tmp = path.with_name(path.name + ".tmp")
    fd, offsets, crcs, runs, failed = None, {}, {}, [], None
    if rank == 0:
        total = {g: sum(c[g] for c in counts) for g in groups}
        try:
            offsets = _lay_out(tmp, snap, {g: {k: ((total[g], *shape), dtype) for k, (shape, dtype) in
                                               specs[g].items()} for g in groups})
            fd = os.open(tmp, os.O_WRONLY)
        except (OSError, RuntimeError) as err:  # disk full while HDF5 lays it out: the rows still come
            failed = err if isinstance(err, OSError) else OSError(str(err))
            offsets = {g: {} for g in groups}
        crcs = {g: {k: 0 for k in offsets[g]} for g in groups}
    steps = {}
    for g in groups:
        record = max(sum(int(np.prod(shape, dtype=np.int64)) * _np_dtype(dtype).itemsize
                         for shape, dtype in specs[g].values()), 1)
        steps[g] = max(1, chunk_bytes // record)
    # This rank's own chunks, in the order they are written, read one ahead on a thread (a paged
    # store's pread and the column copies release the GIL) while the previous one is written or sent.
    own = [(g, lo, min(counts[rank][g], lo + steps[g])) for g in groups for lo in range(0, counts[rank][g], steps[g])]
    pool = ThreadPoolExecutor(max_workers=1)
    ahead = deque()

    def submit():
        g_, lo_, hi_ = own.pop(0)
        ahead.append(pool.submit(lambda: [_to_numpy(t)[0] for t in map(sources[g_].read(lo_, hi_).__getitem__, specs[g_])]))

    def read_next():
        if not ahead:
            submit()
        arrays = ahead.popleft().result()
        if own:  # the next one is read while this one is written or sent
            submit()
        return arrays

    try:
        for g in groups:
            keys = list(specs[g])
            sizes = [int(np.prod(shape, dtype=np.int64)) * _np_dtype(dtype).itemsize for shape, dtype in specs[g].values()]
            step = steps[g]
            base = 0
            for r in range(size):
                n = counts[r][g]
                for lo in range(0, n, step):
                    hi = min(n, lo + step)
                    arrays = None
                    if rank == r:
                        arrays = read_next()
                        if r != 0:
                            comm.Send(np.concatenate([a.reshape(-1).view(np.uint8) for a in arrays]) if arrays
                                      else np.zeros(0, np.uint8), dest=0, tag=TAG)
                    elif rank == 0:
                        buf = np.empty((hi - lo) * sum(sizes), dtype=np.uint8)
                        comm.Recv(buf, source=r, tag=TAG)
                        arrays, at = [], 0
                        for k, s in zip(keys, sizes):
                            shape, dtype = specs[g][k]
                            arrays.append(buf[at:at + (hi - lo) * s].view(_np_dtype(dtype)).reshape(hi - lo, *shape))
                            at += (hi - lo) * s
                    if rank == 0 and failed is None:
                        try:
                            _write_chunk(fd, g, keys, arrays, offsets, crcs, runs, base + lo, base + hi)
                        except OSError as err:  # disk full: keep receiving (the senders must not hang)
                            failed = err
                    arrays = None
                base += n
        if rank == 0 and failed is None:
            os.fsync(fd)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if fd is not None:
            os.close(fd)
    if rank != 0:
        return
    if failed is not None:
        tmp.unlink(missing_ok=True)
        raise failed
    import h5py

    try:
        with h5py.File(tmp, "r+") as f:
            for g in groups:
                for k, value in crcs[g].items():
                    f[g][k].attrs["crc32"] = value
        seal(tmp, known=runs)  # the whole-file checksum, once every byte is in; the rows' runs are not read back
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written file is left behind
        raise
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if on_tmp_written is not None:  # tests: the moment before the rename
        on_tmp_written(tmp)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)

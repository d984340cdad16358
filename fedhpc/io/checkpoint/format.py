"""The checkpoint file: one self-contained HDF5 file per checkpointed round, laid out by client id
so that any number of ranks can read it back, and plain enough to open with h5py or `h5dump`.

A run's checkpoints are `runs/<name>/checkpoints/round-000007.h5`, each laid out as:

    /                  attrs: format, format_version, round, rounds, num_clients, strategy,
                              bytes_up, bytes_down, mpi_bytes, wall_seconds, created
    /config            string: the resolved config (YAML)
    /metrics           string: metrics.jsonl up to this round (one JSON object per line)
    /server/<key>      replicated server tensors (adapters, cluster ids, control variates, ...)
    /clients/<key>     [num_clients, ...] what each client keeps: kept adapters + strategy extras
    /optimizer/<key>   [num_clients, ...] optimizer state (only with strategy.keep_optimizer_state)

Every dataset carries attrs `crc32` (zlib CRC-32 of its C-order bytes) and `torch_dtype`
(bfloat16, which numpy and HDF5 lack, is stored as its uint16 bits). Client datasets are
chunked one client per chunk.

The whole file is checksummed too (format version 2): HDF5's metadata (attributes such as the
round, object headers, chunk indexes) lies outside the datasets' CRCs, and HDF5 1.10's default
structures carry no checksum of their own, so a flipped bit there could go unseen or change
what is read. The file starts with a 512-byte HDF5 user block, which HDF5 skips; when the file is
complete the writer puts `fedhpc-checkpoint crc32 <8 hex digits> <bytes>` there: the CRC-32 and
length of everything after the user block (`seal`). CRC-32 detects every single-bit error and
every burst of up to 32 bits. Version 1 files (no user block) are checked per dataset only.

This module lays a file out, reads one back, checks its checksums and describes it
(`fedhpc inspect`). Which file to resume from is `resume.py`; when and how a file is written
(gather, background thread, atomic rename) is `writer.py`.
"""
from __future__ import annotations

import functools
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

__all__ = ["FORMAT", "FORMAT_VERSION", "CheckpointError", "checkpoint_dir", "Snapshot", "lay_out", "seal", "verify",
           "describe", "read_config", "saved_round", "Restored", "load", "restore_rows"]

FORMAT = "fedhpc-checkpoint"
FORMAT_VERSION = 2
USERBLOCK = 512
"""Bytes of the HDF5 user block at the start of the file, which holds the whole-file checksum."""
SEAL = b"fedhpc-checkpoint crc32 "
WHOLE_FILE = "(whole file)"
"""The name `verify` gives the whole-file checksum's row."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (torn, corrupt, or of another format)."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _file_name(round_index: int) -> str:
    return f"round-{round_index:06d}.h5"


# --- tensors <-> numpy ------------------------------------------------------------------------
def _to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    t = t.detach().to("cpu").contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if t.dtype == torch.bfloat16:
        t = t.view(torch.uint16)
    return t.numpy(), name


def _from_numpy(a: np.ndarray, name: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if name == "bfloat16" else t


def _crc(data) -> int:
    if isinstance(data, str):
        data = data.encode()
    return zlib.crc32(np.ascontiguousarray(data).view(np.uint8) if isinstance(data, np.ndarray) else data)


# --- writing the layout -----------------------------------------------------------------------
@dataclass
class Snapshot:
    """What rank 0 writes: plain numpy arrays and text, detached from the running loop."""
    round: int
    attrs: dict
    config: str
    metrics: str
    tensors: dict[str, dict[str, tuple[np.ndarray, str]]]
    """group ('server' | 'clients' | 'optimizer') -> key -> (array, torch dtype name)."""


def lay_out(path: Path, snap: Snapshot) -> list[tuple[int, np.ndarray]]:
    """Create the HDF5 file `path` holding `snap`, all but the bytes of the client rows: their
    chunks are allocated up front and left unfilled. Returns (file offset, row) of every client
    chunk, for the caller to write into the closed file (no filters: a chunk is the row's bytes).
    """
    import h5py

    rows = []
    with h5py.File(path, "w", userblock_size=USERBLOCK) as f:
        f.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "round": snap.round, **snap.attrs})
        for name, text in (("config", snap.config), ("metrics", snap.metrics)):
            ds = f.create_dataset(name, data=text, dtype=h5py.string_dtype())
            ds.attrs["crc32"] = _crc(text)
        for group, tensors in snap.tensors.items():
            g = f.create_group(group)
            for key, (array, dtype_name) in tensors.items():
                if "/" in key:
                    raise ValueError(f"checkpoint: tensor key {key!r} must not contain '/'")
                if group != "server" and array.ndim >= 1 and 0 not in array.shape:
                    ds = _allocated_per_client(g, key, array)
                    rows += list(zip(chunk_offsets(ds).tolist(), array))
                else:
                    ds = g.create_dataset(key, data=array)
                ds.attrs.update({"crc32": _crc(array), "torch_dtype": dtype_name})
    return rows


def chunk_offsets(ds) -> np.ndarray:
    """`[rows]` file offset of each row's chunk, in one pass over HDF5's chunk index (a
    get_chunk_info call per row took 6 s per 10⁴ rows of one tensor)."""
    found = np.full(ds.shape[0], -1, dtype=np.int64)

    def visit(info):
        found[info.chunk_offset[0]] = info.byte_offset

    ds.id.chunk_iter(visit)
    if (found < 0).any():
        raise RuntimeError(f"checkpoint: {ds.name} has unallocated chunks")
    return found


def _allocated_per_client(group, key: str, array: np.ndarray):
    """An empty dataset chunked one client per chunk, every chunk allocated now, never filled."""
    import h5py

    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk((1, *array.shape[1:]))
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    space = h5py.h5s.create_simple(array.shape)
    dsid = h5py.h5d.create(group.id, key.encode(), h5py.h5t.py_create(array.dtype), space, dcpl=dcpl)
    return h5py.Dataset(dsid)


_CRC_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    """a(x) b(x) modulo the CRC-32 polynomial (bit-reflected, as zlib's multmodp)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) mod p, k = 0, 1, ...
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


@functools.lru_cache(maxsize=4096)
def _x8nmodp(n: int) -> int:
    """x^(8 n) mod p: what appending n bytes multiplies a CRC by."""
    p, k = 1 << 31, 3
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """zlib.crc32(a + b) from crc1 = zlib.crc32(a), crc2 = zlib.crc32(b) and len2 = len(b), without
    the bytes (zlib's crc32_combine, which Python's zlib module does not expose)."""
    return _multmodp(_x8nmodp(len2), crc1) ^ crc2


def _body_crc(path: Path, known: list[tuple[int, int, int]] | None = None) -> tuple[int, int]:
    """CRC-32 and length of the file's bytes after the user block. `known`: (file offset, length,
    CRC-32) of byte ranges whose CRC the caller computed as it wrote them (non-overlapping, past the
    user block); they are combined in (`crc32_combine`), not read back, and only the bytes between
    them (HDF5's metadata) are read."""
    crc, size = 0, 0
    with open(path, "rb") as handle:
        handle.seek(USERBLOCK)
        if known:
            end = os.fstat(handle.fileno()).st_size
            for offset, length, part in sorted(known):
                if offset < USERBLOCK + size or offset + length > end:
                    raise ValueError(f"{path}: checksummed range {offset}+{length} overlaps another or the end")
                while USERBLOCK + size < offset:
                    chunk = handle.read(min(1 << 22, offset - USERBLOCK - size))
                    crc, size = zlib.crc32(chunk, crc), size + len(chunk)
                crc, size = crc32_combine(crc, part, length), size + length
                handle.seek(offset + length)
        while chunk := handle.read(1 << 22):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return crc, size


def _seal_header(crc: int, size: int) -> bytes:
    """The user block of a sealed file whose bytes after it have this CRC-32 and length."""
    return (SEAL + f"{crc:08x} {size}\n".encode()).ljust(USERBLOCK, b"\0")


def seal(path: str | Path, known: list[tuple[int, int, int]] | None = None) -> None:
    """Record the CRC-32 and length of everything after the user block in the user block (the
    file is complete: called just before the rename that publishes it). Not fsynced here.
    `known`: byte ranges the writer already checksummed (`_body_crc`), not read back."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, _seal_header(*_body_crc(Path(path), known)), 0)
    finally:
        os.close(fd)


def _whole_file_row(path: Path) -> tuple[str, tuple, str, int, bool] | None:
    """The whole-file checksum's row for `verify`, None for a version-1 file (no user block);
    raises CheckpointError for a file shorter than it was written (torn, truncated). The user
    block must be exactly what `seal` writes for the bytes that follow it, so a flipped bit in
    the block itself (its digits, its zero padding) counts as a mismatch too."""
    with open(path, "rb") as handle:
        head = handle.read(USERBLOCK)
    if head.startswith(b"\x89HDF"):
        return None  # version 1: no user block
    crc, size = _body_crc(path)
    if head == _seal_header(crc, size):
        return (WHOLE_FILE, (), "bytes", size, True)
    try:
        length = int(head[len(SEAL):].split(b"\n", 1)[0].split()[1])
    except (ValueError, IndexError):
        length = -1
    if head.startswith(SEAL) and size < length:
        raise CheckpointError(f"{path}: unreadable (truncated: {size + USERBLOCK} of {length + USERBLOCK} bytes)")
    return (WHOLE_FILE, (), "bytes", size, False)


# --- reading and checking one file ------------------------------------------------------------
def _datasets(f) -> list:
    import h5py

    found = []
    f.visititems(lambda name, obj: found.append(obj) if isinstance(obj, h5py.Dataset) else None)
    return found


def _read_text(ds) -> str:
    value = ds[()]
    return value.decode() if isinstance(value, bytes) else str(value)


def verify(path: str | Path) -> list[tuple[str, tuple, str, int, bool]]:
    """Every dataset's (name, shape, dtype, bytes, checksum ok), first the whole file's (version 2);
    raises CheckpointError if the file is not a readable fedhpc checkpoint."""
    import h5py

    try:
        whole = _whole_file_row(Path(path))
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not a fedhpc checkpoint")
            rows = []
            for ds in _datasets(f):
                data = _read_text(ds) if ds.dtype.kind == "O" else ds[()]
                ok = "crc32" in ds.attrs and _crc(data) == int(ds.attrs["crc32"])
                rows.append((ds.name, ds.shape, ds.attrs.get("torch_dtype", "str"), int(ds.id.get_storage_size()), ok))
            return ([whole] if whole else []) + rows
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as err:  # torn or truncated: HDF5 cannot parse it
        raise CheckpointError(f"{path}: unreadable ({str(err).splitlines()[0]})") from None


def describe(path: str | Path) -> tuple[str, bool]:
    """`fedhpc inspect`: a readable summary of a checkpoint, and whether every checksum holds."""
    import h5py

    if not Path(path).is_file():
        raise FileNotFoundError(f"inspect: '{path}' does not exist")
    rows = verify(path)
    try:
        with h5py.File(path, "r") as f:
            a = dict(f.attrs)
            metrics = [json.loads(line) for line in _read_text(f["metrics"]).splitlines() if line]
        a = {k: a[k] for k in ("format", "format_version", "round", "rounds", "num_clients", "strategy", "created",
                               "bytes_up", "bytes_down", "wall_seconds")}
    except (OSError, KeyError, ValueError, RuntimeError) as err:  # what the bad checksum spoiled
        bad = [name for name, *_, ok in rows if not ok]
        raise CheckpointError(f"{path}: unreadable ({str(err).splitlines()[0]}); checksum MISMATCH in "
                              f"{', '.join(bad[:3]) or 'nothing'}") from None
    bad = [name for name, *_, ok in rows if not ok]
    lines = [f"{path}: {a['format']} v{a['format_version']}, round {a['round']} of {a['rounds']}, "
             f"{a['num_clients']} clients, strategy {a['strategy']}, written {a['created']}",
             f"  bytes up {a['bytes_up']}, down {a['bytes_down']}; {len(metrics)} metrics line(s); "
             f"wall seconds so far {float(a['wall_seconds']):.1f}",
             f"  {'dataset':<52} {'shape':<16} {'dtype':<8} {'bytes':>10}  checksum"]
    for name, shape, dtype, size, ok in rows:
        lines.append(f"  {name:<52} {str(shape):<16} {dtype:<8} {size:>10}  {'ok' if ok else 'BAD'}")
    datasets = [row for row in rows if row[0] != WHOLE_FILE]
    total = sum(size for _, _, _, size, _ in datasets)
    lines.append(f"  {len(datasets)} datasets, {total} bytes of data, file {Path(path).stat().st_size} bytes; "
                 + (f"checksum MISMATCH in {len(bad)}: {', '.join(bad[:3])}" if bad else "all checksums ok"))
    return "\n".join(lines), not bad


def read_config(path: str | Path) -> dict:
    """The resolved config stored in a checkpoint."""
    import h5py

    with h5py.File(path, "r") as f:
        return yaml.safe_load(_read_text(f["config"]))


def saved_round(path: str | Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f.attrs["round"])


@dataclass
class Restored:
    """This rank's share of a checkpoint, on its device."""
    round: int
    server: dict[str, torch.Tensor]
    clients: dict[str, torch.Tensor]
    """This rank's rows `[hosted, ...]` of each client tensor."""
    optimizer: dict[str, torch.Tensor] | None
    totals: dict[str, int]
    metrics: list[dict]
    wall_seconds: float


def load(path: str | Path, *, clients: np.ndarray, device, client_rows: bool = True) -> Restored:
    """Read the server state and the rows of `clients` (a contiguous block) from `path`
    (`client_rows=False`: no rows, `clients` / `optimizer` empty; see `restore_rows`)."""
    import h5py

    rows = slice(int(clients[0]), int(clients[-1]) + 1) if client_rows else slice(0, 0)

    def read(group, select):
        return {key: _from_numpy(ds[select], ds.attrs["torch_dtype"]).to(device) for key, ds in group.items()}

    with h5py.File(path, "r") as f:
        a = f.attrs
        return Restored(
            round=int(a["round"]), server=read(f["server"], ()), clients=read(f["clients"], rows),
            optimizer=read(f["optimizer"], rows) if "optimizer" in f else None,
            totals={k: int(a[k]) for k in ("bytes_up", "bytes_down", "mpi_bytes")},
            metrics=[json.loads(line) for line in _read_text(f["metrics"]).splitlines() if line],
            wall_seconds=float(a["wall_seconds"]))


def restore_rows(path: str | Path, group: str, store, *, clients: np.ndarray, chunk_bytes: int = 64 << 20) -> None:
    """Copy the rows of `clients` (a contiguous block) of `group` into a paged store, at most
    `chunk_bytes` of rows at a time (`store.write_rows(lo, tensors)`, `store.spec`); refuses a
    checkpoint whose keys or row shapes differ from the store's."""
    import h5py

    first, count = int(clients[0]), len(clients)
    with h5py.File(path, "r") as f:
        if group not in f or set(f[group]) != set(store.spec) or any(
                tuple(f[group][k].shape[1:]) != store.spec[k][0] for k in store.spec):
            raise CheckpointError(f"checkpoint {group} tensors do not match this run's strategy and model "
                                  f"(saved: {sorted(f[group]) if group in f else []}, needed: {sorted(store.spec)})")
        g = f[group]
        row = sum(int(np.prod(g[k].shape[1:])) * g[k].dtype.itemsize for k in g)
        step = max(1, chunk_bytes // max(row, 1))
        for lo in range(0, count, step):
            hi = min(count, lo + step)
            store.write_rows(lo, {k: _from_numpy(g[k][first + lo:first + hi], g[k].attrs["torch_dtype"]) for k in g})

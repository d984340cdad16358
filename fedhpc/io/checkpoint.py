"""HDF5 checkpoints: everything a run needs to resume exactly, on any rank count.

One file per checkpointed round, `runs/<name>/checkpoints/round-000007.h5` (the last
`checkpoint.keep` are kept), laid out by client id so any number of ranks can read it back:

    /                  attrs: format, format_version, round, rounds, num_clients, strategy,
                              bytes_up, bytes_down, mpi_bytes, wall_seconds, created
    /config            string: the resolved config (YAML)
    /metrics           string: metrics.jsonl up to this round (one JSON object per line)
    /server/<key>      replicated server tensors (adapters, cluster ids, control variates, ...)
    /clients/<key>     [num_clients, ...] what each client keeps: kept adapters + strategy extras
    /optimizer/<key>   [num_clients, ...] optimizer state (only with strategy.keep_optimizer_state)

Every dataset carries attrs `crc32` (zlib CRC-32 of its C-order bytes) and `torch_dtype`
(bfloat16 is stored as its uint16 bits). Client datasets are chunked one client per chunk.

Writing: PyPI h5py has no MPI driver, so the ranks gather their client rows to rank 0
(one Gatherv per tensor, over MPI, which is far faster than the disk), and rank 0 hands that
snapshot to a background thread which writes `<file>.tmp`, fsyncs it, renames it into place
and fsyncs the directory: a checkpoint is complete or absent, and the round loop waits only
for the gather. One self-contained file per round moves and copies like any file, opens in
`h5dump` with no virtual-dataset source paths to resolve, and becomes visible with a single
rename, where per-rank shards joined by a virtual dataset would need a cross-rank protocol to
know when every shard is durable. The price is one copy of all client state in rank 0's memory
while a write is in flight (the same bytes the file holds).

No RNG state is stored because there is none to store: every random draw in a run comes from
a generator keyed by (seed, client, round, purpose) (sampling, data order, dropout masks,
initialisation, data), never from a global stream (tests/test_checkpoint.py checks that a run
leaves the global torch / numpy / random states untouched).
"""
from __future__ import annotations

import datetime
import json
import os
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from .run_dir import json_line

__all__ = ["CheckpointConfig", "Checkpointer", "Restored", "Snapshot", "write_checkpoint", "verify", "describe",
           "find_resumable", "read_config", "resume_config", "saved_round", "load", "checkpoint_dir",
           "CheckpointError", "FORMAT"]

FORMAT = "fedhpc-checkpoint"
FORMAT_VERSION = 1


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 1
    """Write a checkpoint every this many rounds, and always after the last one (0: only when
    preempted by SIGTERM / SIGUSR1)."""
    keep: int = 2
    """Checkpoints kept on disk; older ones are deleted once a newer one is complete."""
    background: bool = True
    """Write on a background thread (the round loop waits only for the gather to rank 0)."""

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"every must be >= 0, got {self.every}")
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1, got {self.keep}")


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


# --- the file ---------------------------------------------------------------------------------
@dataclass
class Snapshot:
    """What rank 0 writes: plain numpy arrays and text, detached from the running loop."""
    round: int
    attrs: dict
    config: str
    metrics: str
    tensors: dict[str, dict[str, tuple[np.ndarray, str]]]
    """group ('server' | 'clients' | 'optimizer') -> key -> (array, torch dtype name)."""


def write_checkpoint(path: Path, snap: Snapshot) -> None:
    """Write `snap` to `path` atomically: `<path>.tmp`, fsync, rename, fsync the directory.

    h5py lays out the file and allocates every client chunk up front; the chunks' bytes then go
    in with plain `os.pwrite` calls, which release the GIL (HDF5 calls do not), so a background
    write does not stall the round loop's Python thread (no filters: a chunk is the row's bytes).
    """
    import h5py

    tmp = path.with_name(path.name + ".tmp")
    rows = []  # (file offset, row) of every client chunk
    with h5py.File(tmp, "w") as f:
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
                    rows += [(ds.id.get_chunk_info(i).byte_offset, array[i]) for i in range(array.shape[0])]
                else:
                    ds = g.create_dataset(key, data=array)
                ds.attrs.update({"crc32": _crc(array), "torch_dtype": dtype_name})
    fd = os.open(tmp, os.O_WRONLY)
    try:
        for offset, row in rows:
            os.pwrite(fd, np.ascontiguousarray(row), offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _datasets(f) -> list:
    import h5py

    found = []
    f.visititems(lambda name, obj: found.append(obj) if isinstance(obj, h5py.Dataset) else None)
    return found


def _read_text(ds) -> str:
    value = ds[()]
    return value.decode() if isinstance(value, bytes) else str(value)


def verify(path: str | Path) -> list[tuple[str, tuple, str, int, bool]]:
    """Every dataset's (name, shape, dtype, bytes, checksum ok); raises CheckpointError if the
    file is not a readable fedhpc checkpoint."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not a fedhpc checkpoint")
            rows = []
            for ds in _datasets(f):
                data = _read_text(ds) if ds.dtype.kind == "O" else ds[()]
                ok = "crc32" in ds.attrs and _crc(data) == int(ds.attrs["crc32"])
                rows.append((ds.name, ds.shape, ds.attrs.get("torch_dtype", "str"), int(ds.id.get_storage_size()), ok))
            return rows
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
    with h5py.File(path, "r") as f:
        a = dict(f.attrs)
        metrics = [json.loads(line) for line in _read_text(f["metrics"]).splitlines() if line]
    bad = [name for name, *_, ok in rows if not ok]
    lines = [f"{path}: {a['format']} v{a['format_version']}, round {a['round']} of {a['rounds']}, "
             f"{a['num_clients']} clients, strategy {a['strategy']}, written {a['created']}",
             f"  bytes up {a['bytes_up']}, down {a['bytes_down']}; {len(metrics)} metrics line(s); "
             f"wall seconds so far {float(a['wall_seconds']):.1f}",
             f"  {'dataset':<52} {'shape':<16} {'dtype':<8} {'bytes':>10}  checksum"]
    for name, shape, dtype, size, ok in rows:
        lines.append(f"  {name:<52} {str(shape):<16} {dtype:<8} {size:>10}  {'ok' if ok else 'BAD'}")
    total = sum(size for _, _, _, size, _ in rows)
    lines.append(f"  {len(rows)} datasets, {total} bytes of data, file {Path(path).stat().st_size} bytes; "
                 + (f"checksum MISMATCH in {len(bad)}: {', '.join(bad[:3])}" if bad else "all checksums ok"))
    return "\n".join(lines), not bad


def _check(path: Path) -> None:
    bad = [name for name, *_, ok in verify(path) if not ok]
    if bad:
        raise CheckpointError(f"{path}: checksum mismatch in {', '.join(bad[:3])}")


def find_resumable(run_dir: str | Path, *, comm, say=print) -> Path | None:
    """The newest checkpoint of a run that passes every checksum (rank 0 checks, all ranks
    get the answer); a bad one is reported in one line and the previous one is tried."""
    choice = None
    if comm.Get_rank() == 0:
        files = sorted(checkpoint_dir(run_dir).glob("round-*.h5"), reverse=True)
        for path in files:
            try:
                _check(path)
                choice = str(path)
                break
            except CheckpointError as err:
                say(f"fedhpc: checkpoint {err}; falling back to the previous one")
    choice = comm.bcast(choice, root=0)
    return Path(choice) if choice else None


def read_config(path: str | Path) -> dict:
    """The resolved config stored in a checkpoint."""
    import h5py

    with h5py.File(path, "r") as f:
        return yaml.safe_load(_read_text(f["config"]))


MAY_CHANGE_ON_RESUME = ("rounds", "device", "out_dir", "name", "train.clients_per_pass", "checkpoint.")
"""Config keys a resumed run may change: none of them alters the numbers of the rounds already run."""


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_config(stored: dict, requested: dict, *, saved_round: int) -> dict:
    """The config of a resumed run: `requested`, which must equal the checkpoint's `stored` one
    except for MAY_CHANGE_ON_RESUME (`train.clients_per_pass: 0` keeps the probed value)."""
    old = _flatten(yaml.safe_load(yaml.safe_dump(stored)))
    new = _flatten(yaml.safe_load(yaml.safe_dump(requested)))
    for key in sorted(old.keys() | new.keys()):
        if key.startswith(MAY_CHANGE_ON_RESUME) or old.get(key) == new.get(key):
            continue
        raise CheckpointError(f"{key}: {new.get(key)!r} differs from the checkpoint's {old.get(key)!r}; a resumed "
                              f"run keeps its config (only rounds, device, train.clients_per_pass and "
                              f"checkpoint.* may change): use a new run name to change it")
    if requested["rounds"] < saved_round:
        raise CheckpointError(f"rounds: {requested['rounds']} but the checkpoint is at round {saved_round}")
    out = yaml.safe_load(yaml.safe_dump(requested))
    if not out["train"]["clients_per_pass"]:
        out["train"]["clients_per_pass"] = stored["train"]["clients_per_pass"]
    return out


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


def load(path: str | Path, *, clients: np.ndarray, device) -> Restored:
    """Read the server state and the rows of `clients` (a contiguous block) from `path`."""
    import h5py

    rows = slice(int(clients[0]), int(clients[-1]) + 1)

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


# --- the writer -------------------------------------------------------------------------------
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
        """Collective: snapshot this round and write it (in the background unless `wait`)."""
        t0 = time.perf_counter()
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
            self.thread = threading.Thread(target=self._write, args=(path, snap), name="fedhpc-checkpoint")
            self.thread.start()
            if wait or not self.cfg.background:
                self.wait()
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
        if self.error is not None:
            err, self.error = self.error, None
            print(f"fedhpc: warning: checkpoint write failed ({type(err).__name__}: {err}); "
                  f"the previous checkpoint is kept", flush=True)

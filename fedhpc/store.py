"""A client store with bounded memory: hot rows in memory, cold rows in a file in the run directory.

`ClientStore` (clients.py) keeps every hosted client's state as stacked `[clients, ...]` tensors in
RAM. `PagedStore` keeps the same rows with the same `get` / `put` interface, but holds in memory
only an LRU cache of recently used clients (this round's participants, on the rank's device), at
most `store.memory_cap_mb`; the rest live in one flat file per rank and group under
`<run>/store/`, one contiguous record per client (every key of a client in one `pread`), written
back when evicted. A row never written reads as the strategy's initial row, so a fresh run
writes nothing up front.

With `store.dtype: bfloat16` every row is rounded to bfloat16 when it is put (training still
runs in float32 on the float32 copy `get` returns): the rounding happens at `put`, not at
eviction, so the results do not depend on the cap or on which rows happened to be paged out.

`make_store` chooses: the plain in-memory `ClientStore` when the rows fit under the cap in
float32 (the default, and bit-identical to before), else a `PagedStore`. Paging float32 rows
through a file is lossless, so a capped run gives the same bits as an uncapped one.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

__all__ = ["StoreConfig", "PagedStore", "make_store", "default_cap_bytes", "RowSource", "TensorRows"]

MB = 1 << 20


@dataclass(kw_only=True)
class StoreConfig:
    memory_cap_mb: float = 0.0
    """Memory for client rows per rank (clients + optimizer state together), in MiB. 0: a quarter of
    the machine's physical memory shared among the node's ranks. Rows beyond it are paged to a file
    in the run directory (float32 paging is lossless: the cap changes no number)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Precision of the stored client rows. bfloat16 halves the store's memory, disk and checkpoint
    bytes; every kept row (adapters and optimizer moments) is rounded to bfloat16 after each round,
    so results differ from float32 by that rounding (training itself runs in float32)."""

    def __post_init__(self):
        if self.memory_cap_mb < 0:
            raise ValueError(f"memory_cap_mb must be >= 0 (0: derived from the machine), got {self.memory_cap_mb}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")


def default_cap_bytes(local_ranks: int = 1) -> int:
    """A quarter of physical memory, shared among the node's ranks."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return int(total // 4 // max(1, local_ranks))


class RowSource:
    """What a streamed checkpoint reads: `count` rows of `spec` (key -> (row shape, torch dtype)),
    `read(lo, hi)` -> key -> `[hi - lo, ...]` CPU tensors in the stored dtype."""
    count: int
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]]

    def read(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class TensorRows(RowSource):
    """A plain dict of stacked tensors seen as a RowSource."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.count = next(iter(tensors.values())).shape[0] if tensors else 0
        self.spec = {k: (tuple(v.shape[1:]), v.dtype) for k, v in tensors.items()}

    def read(self, lo, hi):
        return {k: v[lo:hi].detach().cpu() for k, v in self.tensors.items()}


class PagedStore(RowSource):
    """`ClientStore`'s interface over an LRU cache of at most `cap_bytes` plus a per-client file."""

    def __init__(self, clients: np.ndarray, init: dict[str, torch.Tensor], *, path: str | Path, cap_bytes: int,
                 dtype: torch.dtype = torch.float32, device="cpu"):
        """`init`: key -> the initial row `[1, ...]` (or `[...]`) every client starts from."""
        self.first = int(clients[0]) if len(clients) else 0
        self.count = len(clients)
        self.dtype, self.device, self.cap = dtype, torch.device(device), int(cap_bytes)
        self.keys = sorted(init)
        self.init = {k: init[k][0].detach().to("cpu", self._stored(init[k].dtype)).contiguous().clone()
                     for k in self.keys}
        self.spec = {k: (tuple(self.init[k].shape), self.init[k].dtype) for k in self.keys}
        self.out_dtype = {k: init[k].dtype for k in self.keys}
        self.sizes = [self.init[k].numel() * self.init[k].element_size() for k in self.keys]
        self.record = sum(self.sizes)
        self.written = np.zeros(self.count, dtype=bool)
        self.cache: OrderedDict[int, tuple[dict[str, torch.Tensor], bool]] = OrderedDict()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.reads = self.writes = 0
        """Rows read from / written to the file (for tests and the benchmark)."""

    def _stored(self, dtype: torch.dtype) -> torch.dtype:
        return self.dtype if dtype.is_floating_point else dtype

    def __del__(self):
        self.close()

    def close(self) -> None:
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None

    @property
    def tensors(self):
        raise AttributeError("a PagedStore holds no stacked tensors: read rows with read(lo, hi) or get(ids)")

    @property
    def cached_bytes(self) -> int:
        return len(self.cache) * self.record

    # --- one client's record ------------------------------------------------------------------
    def _decode(self, raw: bytes | memoryview) -> dict[str, torch.Tensor]:
        out, at = {}, 0
        buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if len(raw) else torch.zeros(0, dtype=torch.uint8)
        for k, size in zip(self.keys, self.sizes):
            shape, dtype = self.spec[k]
            out[k] = buf[at:at + size].clone().view(dtype).view(shape)
            at += size
        return out

    def _encode(self, row: dict[str, torch.Tensor]) -> bytes:
        return b"".join(row[k].detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for k in self.keys)

    def _load(self, i: int) -> dict[str, torch.Tensor]:
        """Row i (0-based on this rank) in the stored dtype, on CPU; cache untouched."""
        hit = self.cache.get(i)
        if hit is not None:
            return hit[0]
        if self.written[i]:
            self.reads += 1
            return self._decode(os.pread(self.fd, self.record, i * self.record))
        return dict(self.init)

    def _remember(self, i: int, row: dict[str, torch.Tensor], dirty: bool) -> None:
        old = self.cache.pop(i, None)
        self.cache[i] = (row, dirty or (old is not None and old[1]))
        self._evict()

    def _evict(self) -> None:
        while self.cache and self.cached_bytes > self.cap:
            i, (row, dirty) = self.cache.popitem(last=False)
            if dirty:
                os.pwrite(self.fd, self._encode(row), i * self.record)
                self.written[i] = True
                self.writes += 1

    # --- ClientStore's interface --------------------------------------------------------------
    def get(self, ids: np.ndarray) -> dict[str, torch.Tensor]:
        rows = []
        for c in np.asarray(ids):
            i = int(c) - self.first
            row = self._load(i)
            self._remember(i, row, False)
            rows.append(row)
        return {k: torch.stack([row[k] for row in rows]).to(self.device, self.out_dtype[k]) for k in self.keys}

    def put(self, ids: np.ndarray, values: dict[str, torch.Tensor]) -> None:
        for j, c in enumerate(np.asarray(ids)):
            i = int(c) - self.first
            row = dict(self._load(i))
            for k, v in values.items():
                row[k] = v[j].detach().to("cpu", self.spec[k][1]).clone()
            self._remember(i, row, True)

    # --- RowSource (streamed checkpoints) and restoring ----------------------------------------
    def read(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """Rows [lo, hi) in the stored dtype, on CPU: one pread for the run, decoded per key as
        column slices of the [rows, record] bytes, then cached and never-written rows over it."""
        n = hi - lo
        raw = os.pread(self.fd, n * self.record, lo * self.record) if self.written[lo:hi].any() else b""
        if len(raw) == n * self.record:  # the usual case: every row on file, no zero-filled copy
            table = np.frombuffer(raw, dtype=np.uint8).reshape(n, self.record)
        else:
            table = np.zeros((n, self.record), dtype=np.uint8)
            table.reshape(-1)[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        out, at = {}, 0
        for k, size in zip(self.keys, self.sizes):
            shape, dtype = self.spec[k]
            column = table[:, at:at + size].copy()
            out[k] = torch.from_numpy(column).view(dtype).view(n, *shape)
            at += size
        for j in np.flatnonzero(~self.written[lo:hi]):
            for k in self.keys:
                out[k][j] = self.init[k]
        for i, (row, _) in self.cache.items():
            if lo <= i < hi:
                for k in self.keys:
                    out[k][i - lo] = row[k]
        return out

    def write_rows(self, lo: int, values: dict[str, torch.Tensor]) -> None:
        """Rows [lo, lo + n) straight into the file (restoring from a checkpoint), bypassing the cache."""
        n = next(iter(values.values())).shape[0]
        parts = [values[k].detach().to("cpu", self.spec[k][1]).contiguous().view(n, -1).view(torch.uint8)
                 for k in self.keys]
        block = torch.cat(parts, 1).numpy().tobytes()
        os.pwrite(self.fd, block, lo * self.record)
        for i in range(lo, lo + n):
            self.cache.pop(i, None)
        self.written[lo:lo + n] = True


def make_store(clients: np.ndarray, init: dict[str, torch.Tensor], *, path: str | Path, cap_bytes: int,
               dtype: str = "float32", device="cpu"):
    """The plain in-memory store when every hosted row fits under `cap_bytes` in float32, else a
    `PagedStore` caching at most `cap_bytes` of rows (`init`: key -> initial row `[1, ...]`)."""
    from .clients import ClientStore

    row_bytes = sum(v[0].numel() * v.element_size() for v in init.values())
    if not init or (dtype == "float32" and row_bytes * len(clients) <= cap_bytes):
        return ClientStore(clients, {k: v.expand(len(clients), *v.shape[1:]).clone() for k, v in init.items()})
    stored = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    return PagedStore(clients, init, path=path, cap_bytes=cap_bytes, dtype=stored, device=device)

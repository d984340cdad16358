"""The declared reductions: a weighted mean per group, and a gather in client-id order.

Mean per group: each rank sums its clients' contributions into `[num_groups, ...]` in float64
as its passes finish, then a single `Allreduce` joins the ranks. Summing in float64 makes the
result independent of how clients are spread over ranks (to float64 rounding, far below
float32 resolution), and the bytes a rank sends are bounded by groups x adapter size, never
by the number of clients it hosts.

Gather: methods that concatenate every client's factors (FLoRA, ILoRA) need the rows
themselves; they travel in float32 with one `Allgatherv` and are sorted by client id, so
the rank count changes nothing. Their bytes grow with the participants, as the method's do.
"""
from __future__ import annotations

import numpy as np
import torch

from ..kernels import segment_sum
from ..strategies.base import Contribution, Reduced

__all__ = ["GroupReduction", "allreduce_sum"]


def allreduce_sum(values: torch.Tensor, *, comm) -> torch.Tensor:
    """Sum a tensor over ranks in float64 (a new CPU tensor; COMM_SELF returns a copy)."""
    from mpi4py import MPI

    send = np.ascontiguousarray(values.detach().to("cpu", torch.float64).numpy())
    recv = np.empty_like(send)
    comm.Allreduce([send, MPI.DOUBLE], [recv, MPI.DOUBLE], op=MPI.SUM)
    return torch.from_numpy(recv)


class GroupReduction:
    """Accumulates a rank's contributions pass by pass; `finish` joins all ranks.

    `shapes` gives each reduced key's per-client shape, so a rank without participants this
    round still joins the collective (with zeros).
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], num_groups: int,
                 gather_shapes: dict[str, tuple[int, ...]] | None = None):
        self.shapes = dict(shapes)
        self.num_groups = num_groups
        self.buffer = torch.zeros(num_groups, _width(self.shapes) + 1, dtype=torch.float64)
        self.gather_shapes = dict(gather_shapes or {})
        self.rows: list[torch.Tensor] = []  # gathered rows, float32 [C, width]
        self.meta: list[torch.Tensor] = []  # (client id, weight) per gathered row, float64 [C, 2]

    def add(self, contrib: Contribution) -> None:
        w = contrib.weights.to("cpu", torch.float64)
        rows = torch.cat([_flat(contrib.tensors[k], torch.float64) for k in self.shapes]
                         + [torch.ones(len(w), 1, dtype=torch.float64)], dim=1)
        self.buffer += segment_sum(rows, contrib.groups.to("cpu"), w, self.num_groups)
        if self.gather_shapes:
            self.rows.append(torch.cat([_flat(contrib.gathered[k], torch.float32) for k in self.gather_shapes], dim=1))
            ids = torch.as_tensor(np.asarray(contrib.clients, dtype=np.float64).copy())
            self.meta.append(torch.stack([ids, w], dim=1))

    def finish(self, *, comm) -> tuple[Reduced, int]:
        """The reduction on every rank, and the bytes this rank contributed to the collectives."""
        total = allreduce_sum(self.buffer, comm=comm)
        weights = total[:, -1]
        means = total[:, :-1] / weights.clamp(min=1e-300).unsqueeze(1)
        reduced = Reduced(_split(means, self.shapes, torch.float32), weights)
        sent = self.buffer.numel() * self.buffer.element_size()
        if self.gather_shapes:
            rows = torch.cat(self.rows) if self.rows else torch.zeros(0, _width(self.gather_shapes))
            meta = torch.cat(self.meta) if self.meta else torch.zeros(0, 2, dtype=torch.float64)
            rows, meta = _allgather_rows(rows, comm=comm), _allgather_rows(meta, comm=comm)
            order = torch.argsort(meta[:, 0])
            reduced.gathered = _split(rows[order], self.gather_shapes, torch.float32)
            reduced.gathered_clients = meta[order, 0].to(torch.int64)
            reduced.gathered_weights = meta[order, 1]
            sent += sum(t.numel() * t.element_size() for t in self.rows + self.meta)
        return reduced, sent


def _width(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(int(np.prod(s)) for s in shapes.values())


def _flat(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to("cpu", dtype).flatten(1)


def _split(rows: torch.Tensor, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Columns of `rows` `[n, width]` back into tensors `[n, *shape]`, in `shapes` order."""
    out, offset = {}, 0
    for key, shape in shapes.items():
        size = int(np.prod(shape))
        out[key] = rows[:, offset:offset + size].reshape(len(rows), *shape).to(dtype)
        offset += size
    return out


def _allgather_rows(rows: torch.Tensor, *, comm) -> torch.Tensor:
    """Concatenate every rank's rows `[n_rank, width]` in rank order (one `Allgatherv`)."""
    from mpi4py import MPI

    send = np.ascontiguousarray(rows.numpy())
    counts = np.array(comm.allgather(send.size), dtype=np.int64)
    recv = np.empty(int(counts.sum()), dtype=send.dtype)
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
    comm.Allgatherv(send, [recv, counts, displs, MPI._typedict[send.dtype.char]])
    return torch.from_numpy(recv.reshape(-1, rows.shape[1]))

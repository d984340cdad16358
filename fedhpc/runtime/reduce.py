"""The declared reduction: a weighted mean per group, local segmented sums then one collective.

Each rank sums its clients' contributions into `[num_groups, ...]` in float64 as its passes
finish, then a single `Allreduce` joins the ranks. Summing in float64 makes the result
independent of how clients are spread over ranks (to float64 rounding, far below float32
resolution), and the bytes a rank sends are bounded by groups x adapter size, never by the
number of clients it hosts.
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

    def __init__(self, shapes: dict[str, tuple[int, ...]], num_groups: int):
        self.shapes = dict(shapes)
        self.sizes = [int(np.prod(s)) for s in self.shapes.values()]
        self.num_groups = num_groups
        self.buffer = torch.zeros(num_groups, sum(self.sizes) + 1, dtype=torch.float64)

    def add(self, contrib: Contribution) -> None:
        w = contrib.weights.to("cpu", torch.float64)
        rows = torch.cat([contrib.tensors[k].detach().to("cpu", torch.float64).flatten(1) for k in self.shapes]
                         + [torch.ones(len(w), 1, dtype=torch.float64)], dim=1)
        self.buffer += segment_sum(rows, contrib.groups.to("cpu"), w, self.num_groups)

    def finish(self, *, comm) -> tuple[Reduced, int]:
        """Group means on every rank, and the bytes this rank contributed to the collective."""
        total = allreduce_sum(self.buffer, comm=comm)
        weights = total[:, -1]
        means = total[:, :-1] / weights.clamp(min=1e-300).unsqueeze(1)
        out, offset = {}, 0
        for (key, shape), size in zip(self.shapes.items(), self.sizes):
            out[key] = means[:, offset:offset + size].reshape(self.num_groups, *shape).to(torch.float32)
            offset += size
        return Reduced(out, weights), self.buffer.numel() * self.buffer.element_size()

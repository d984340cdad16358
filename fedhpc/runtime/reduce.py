"""Carrying out a declared exchange (`runtime/exchange.py`): local sums, then a few collectives.

Mean blocks: each rank sums its clients' rows into `[num_groups, width + 1]` per block in float64
(the last column sums the weights) as its passes finish; all blocks travel in one `Allreduce`.
Summing in float64 makes the result independent of how clients are spread over ranks (to
float64 rounding, far below float32 resolution), and the bytes a rank sends are bounded by
groups x block size, never by the number of clients it hosts.

Gathered blocks: methods that need every client's own factors (FLoRA, ILoRA, ...) get the rows
themselves; all gathered blocks of a client travel as one float32 row with one `Allgatherv`
(plus one for the float64 ids and weights) and are sorted by client id, so the rank count
changes nothing. Their bytes grow with the participants, as the methods' do.
"""
from __future__ import annotations

import numpy as np
import torch

from ..kernels import segment_sum
from .exchange import Exchange, Means, Reduced, Rows

__all__ = ["Reduction", "allreduce_sum"]


def allreduce_sum(values: torch.Tensor, *, comm) -> torch.Tensor:
    """Sum a tensor over ranks in float64 (a new CPU tensor; COMM_SELF returns a copy)."""
    from mpi4py import MPI

    send = np.ascontiguousarray(values.detach().to("cpu", torch.float64).numpy())
    recv = np.empty_like(send)
    comm.Allreduce([send, MPI.DOUBLE], [recv, MPI.DOUBLE], op=MPI.SUM)
    return torch.from_numpy(recv)


class Reduction:
    """Accumulates a rank's uploads pass by pass; `finish` joins all ranks.

    The exchange gives every block's per-client shapes, so a rank without participants this
    round still joins the collectives (with zeros).
    """

    def __init__(self, exchange: Exchange, num_examples: np.ndarray):
        self.exchange, self.num_examples = exchange, num_examples
        self.sums = {name: torch.zeros(b.num_groups, _width(b.keys) + 1, dtype=torch.float64)
                     for name, b in exchange.means().items()}
        self.gathers = exchange.gathers()
        self.rows: list[torch.Tensor] = []  # gathered rows, float32 [C, width of all gathered blocks]
        self.meta: list[torch.Tensor] = []  # (client id, weight in each gathered block), float64

    def add(self, clients: np.ndarray, upload: dict[str, torch.Tensor], scale: np.ndarray | None = None) -> None:
        """These clients' uploads `[C, ...]` (every key the exchange's blocks carry); `scale` `[C]`
        multiplies their weight in every block (a late client's share of its work, runtime/faults.py)."""
        scale = None if scale is None else torch.as_tensor(np.asarray(scale, dtype=np.float64))
        for name, block in self.exchange.means().items():
            w = block.weight_of(clients, self.num_examples)
            if scale is not None:
                w = w * scale
            rows = torch.cat([_flat(upload[k], torch.float64) for k in block.keys]
                             + [torch.ones(len(w), 1, dtype=torch.float64)], dim=1)
            rows[w == 0] = 0.0  # a client that did not train the block counts in nothing, NaN included
            self.sums[name] += segment_sum(rows, block.group_of(clients), w, block.num_groups)
        if self.gathers:
            self.rows.append(torch.cat([_flat(upload[k], torch.float32)
                                        for b in self.gathers.values() for k in b.keys], dim=1))
            ids = torch.as_tensor(np.asarray(clients, dtype=np.float64).copy())
            weights = [b.weight_of(clients, self.num_examples) * (1.0 if scale is None else scale)
                       for b in self.gathers.values()]
            self.meta.append(torch.stack([ids, *weights], dim=1))

    def finish(self, *, comm) -> tuple[Reduced, int]:
        """The reduction on every rank, and the bytes this rank sent to the collectives."""
        reduced, sent = Reduced(), 0
        if self.sums:
            flat = torch.cat([s.flatten() for s in self.sums.values()])
            total, offset = allreduce_sum(flat, comm=comm), 0
            sent += flat.numel() * flat.element_size()
            for (name, block), local in zip(self.exchange.means().items(), self.sums.values()):
                part = total[offset:offset + local.numel()].view_as(local)
                offset += local.numel()
                weights = part[:, -1]
                means = part[:, :-1] / weights.clamp(min=1e-300).unsqueeze(1)
                reduced.blocks[name] = Means(_split(means, block.keys, torch.float32), weights)
        if self.gathers:
            width = sum(_width(b.keys) for b in self.gathers.values())
            rows = torch.cat(self.rows) if self.rows else torch.zeros(0, width)
            meta = torch.cat(self.meta) if self.meta else torch.zeros(0, 1 + len(self.gathers), dtype=torch.float64)
            sent += rows.numel() * rows.element_size() + meta.numel() * meta.element_size()
            rows, meta = _allgather_rows(rows, comm=comm), _allgather_rows(meta, comm=comm)
            order = torch.argsort(meta[:, 0])
            rows, meta, offset = rows[order], meta[order], 0
            for index, (name, block) in enumerate(self.gathers.items()):
                size = _width(block.keys)
                weights = meta[:, 1 + index]
                keep = weights > 0
                values = _split(rows[keep, offset:offset + size], block.keys, torch.float32)
                reduced.blocks[name] = Rows(values, meta[keep, 0].to(torch.int64), weights[keep])
                offset += size
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

"""Heterogeneous LoRA ranks: every client has its own rank r_k, the cohort pads to the largest.

Stacked adapters are `[C, r_max, d_in]` (A) and `[C, d_out, r_max]` (B); client k uses the
leading r_k rows of A and columns of B, the rest is zero. Zero padding is exact for the LoRA
forward (padded rows contribute 0) and for its gradient (each padded entry's gradient is a
product with the other factor's padded entry, 0); the masks here make it hold against
anything else that touches a gradient (control variates, extra losses, weight decay) so
padded entries stay exactly zero through training and aggregation. Each client's LoRA
scaling is `lora_alpha / r_k`, as a peft model of rank r_k has.

Keys name their rank axis by what they contain: `.lora_A` (per-client shape `[r, d_in]`,
axis 0) or `.lora_B` (`[d_out, r]`, axis 1); strategy extras such as `<module>.lora_A.cv`
follow their factor.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ClientRanks", "rank_axis", "numel_at_rank", "mask_to_ranks"]


def rank_axis(key: str) -> int | None:
    """Axis of the rank in a key's per-client shape, or None for rank-free tensors (head, deltas)."""
    if ".lora_A" in key:
        return 0
    if ".lora_B" in key:
        return 1
    return None


def numel_at_rank(key: str, shape: tuple[int, ...], rank: int) -> int:
    """Scalars a client of rank `rank` holds of a key padded to `shape`."""
    axis = rank_axis(key)
    size = int(np.prod(shape))
    return size if axis is None else size // shape[axis] * rank


def _rank_mask(key: str, t: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor | None:
    """`[C, ...]` 0/1 mask broadcastable to `t` keeping each client's leading `ranks[c]` entries."""
    axis = rank_axis(key)
    if axis is None:
        return None
    keep = (torch.arange(t.shape[1 + axis], device=t.device) < ranks.to(t.device).view(-1, 1)).to(t.dtype)
    return keep.view(len(ranks), -1, 1) if axis == 0 else keep.view(len(ranks), 1, -1)


def mask_to_ranks(tensors: dict[str, torch.Tensor], ranks: torch.Tensor, *, inplace: bool = False) -> dict[str, torch.Tensor]:
    """Zero every entry beyond each client's rank (`ranks` `[C]`); rank-free keys pass through."""
    out = dict(tensors)
    for key, t in tensors.items():
        mask = _rank_mask(key, t, ranks)
        if mask is None:
            continue
        if inplace:
            t.mul_(mask)
        else:
            out[key] = t * mask
    return out


@dataclass(frozen=True)
class ClientRanks:
    """Rank and LoRA scaling of every client (ids index `ranks`)."""
    ranks: np.ndarray
    """`[num_clients]` int rank per client."""
    lora_alpha: float

    @property
    def max(self) -> int:
        return int(self.ranks.max())

    def of(self, clients: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(self.ranks[np.asarray(clients)], dtype=torch.int64)

    def scaling(self, clients: np.ndarray) -> torch.Tensor:
        """`[C]` float64 `lora_alpha / r_k`."""
        return self.lora_alpha / self.of(clients).to(torch.float64)

    @property
    def max_scaling(self) -> float:
        """Scaling of a rank-r_max adapter: the global model is evaluated at it."""
        return self.lora_alpha / self.max

"""Dropout whose mask is a pure function of (client key, layer, element): a counter-based RNG.

torch's dropout draws from one global stream, so a client's mask would depend on which other
clients share its pass (and so on the rank count). Here each client's mask is a hash of its
own key, so a client sees the same mask however clients are grouped.
"""
from __future__ import annotations

import torch

__all__ = ["keyed_dropout", "client_keys"]

_MASK = (1 << 62) - 1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A splitmix-style integer hash on int64 (kept to 62 bits so products stay in range)."""
    x = (x ^ (x >> 31)) * 0x5BD1E995 & _MASK
    x = (x ^ (x >> 29)) * 0x27D4EB2F & _MASK
    return x ^ (x >> 32)


def client_keys(seed: int, client_ids: torch.Tensor, round_index: int, step: int) -> torch.Tensor:
    """`[C]` int64 dropout keys for these clients at this local step."""
    base = _mix(torch.tensor(((seed * 1_000_003 + round_index) * 1_000_033 + step) & _MASK))
    return _mix(client_ids.to(torch.int64) * 0x9E3779B1 + base)


def keyed_dropout(h: torch.Tensor, p: float, keys: torch.Tensor, *, salt: int) -> torch.Tensor:
    """Inverted dropout on `h [C, n, d]` with client `c`'s mask drawn from `keys[c]`."""
    count, rows, cols = h.shape
    element = torch.arange(rows * cols, device=h.device, dtype=torch.int64).view(1, rows, cols)
    bits = _mix(_mix(keys.view(count, 1, 1) + salt * 0x632BE5AB) + element)
    keep = (bits & 0xFFFFFF).to(torch.float32) >= p * float(1 << 24)
    return h * keep.to(h.dtype) / (1.0 - p)

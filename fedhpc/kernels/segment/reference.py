"""Weighted per-group sum of client rows in plain torch: out[g] = Σ_{c: id_c = g} w_c · values[c].

``index_add_`` on CPU adds rows in client order, so the result is deterministic and
equals the Triton kernel's (which also walks each group's clients in order). The
accumulation dtype (float64 by default) is applied chunk by chunk over the feature
axis so the upcast copy never exceeds ``CHUNK_BYTES``. On CUDA ``index_add_`` uses
atomics: summation order, hence the last bits, may vary between runs there.
"""
from __future__ import annotations

import torch

CHUNK_BYTES = 64 << 20
"""Largest upcast temporary (all clients x one feature chunk)."""


def segment_sum_reference(values: torch.Tensor, group_ids: torch.Tensor, weights: torch.Tensor,
                          num_groups: int, accumulate_dtype: torch.dtype) -> torch.Tensor:
    """``values [C, F]``, ``group_ids [C]``, ``weights [C]`` -> ``[num_groups, F]`` in accumulate_dtype."""
    C, F = values.shape
    out = torch.zeros(num_groups, F, dtype=accumulate_dtype, device=values.device)
    w = weights.to(accumulate_dtype)[:, None]
    step = max(1, CHUNK_BYTES // (max(C, 1) * out.element_size()))
    for f0 in range(0, F, step):
        contrib = values[:, f0:f0 + step] * w               # promotes to accumulate_dtype (or wider)
        out[:, f0:f0 + step].index_add_(0, group_ids, contrib.to(accumulate_dtype))
    return out

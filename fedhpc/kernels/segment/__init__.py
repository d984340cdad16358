"""Weighted segmented sum of per-client rows into groups (the local half of every reduction)."""
from __future__ import annotations

import torch

from ..dispatch import Backend, Impl, select

__all__ = ["segment_sum"]

IMPLS = (
    Impl("triton", f"{__name__}.triton", "segment_sum_triton"),
    Impl("torch", f"{__name__}.reference", "segment_sum_reference"),
)


def segment_sum(values: torch.Tensor, group_ids: torch.Tensor, weights: torch.Tensor, num_groups: int, *,
                accumulate_dtype: torch.dtype = torch.float64,
                backend: Backend | None = None) -> torch.Tensor:
    """out[g] = Σ_{c: group_ids[c] = g} weights[c] · values[c].

    Args:
        values: per-client rows ``[C, ...]``.
        group_ids: integer ``[C]`` in ``[0, num_groups)``.
        weights: ``[C]``.
        num_groups: number of output rows G.
        accumulate_dtype: dtype of the sum and of the result. float64 (default) makes the
            partial sums exact enough that a later float64 reduction across MPI ranks does
            not depend on how clients were split between ranks.
        backend: force "triton" or "torch" (default: ``FEDHPC_KERNELS`` or automatic).

    Returns:
        ``[num_groups, ...]`` in ``accumulate_dtype``; empty groups are zero. Within a
        group, clients are added in index order on every backend.
    """
    if not isinstance(values, torch.Tensor) or values.ndim < 1:
        raise ValueError(f"values must be a tensor [C, ...], got shape {tuple(getattr(values, 'shape', ()))}")
    C = values.shape[0]
    if not isinstance(group_ids, torch.Tensor) or group_ids.shape != (C,) or group_ids.is_floating_point():
        got = f"{getattr(group_ids, 'dtype', type(group_ids).__name__)} {tuple(getattr(group_ids, 'shape', ()))}"
        raise ValueError(f"group_ids must be an integer tensor [C={C}], got {got}")
    if not isinstance(weights, torch.Tensor) or weights.shape != (C,):
        raise ValueError(f"weights must be a tensor [C={C}], got shape {tuple(getattr(weights, 'shape', ()))}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 0:
        raise ValueError(f"num_groups must be an int >= 0, got {num_groups!r}")
    if not isinstance(accumulate_dtype, torch.dtype) or not accumulate_dtype.is_floating_point:
        raise ValueError(f"accumulate_dtype must be a floating torch.dtype, got {accumulate_dtype!r}")
    if C:
        lo, hi = (int(v) for v in group_ids.aminmax())  # host sync: validation
        if lo < 0 or hi >= num_groups:
            raise ValueError(f"group_ids must lie in [0, {num_groups}), got values in [{lo}, {hi}]")
    rest = values.shape[1:]
    if values.numel() == 0 or num_groups == 0:
        return torch.zeros(num_groups, *rest, dtype=accumulate_dtype, device=values.device)
    flat = values.reshape(C, -1)
    ids = group_ids.to(device=values.device, dtype=torch.int64)
    fn = select("segment_sum", IMPLS, values, backend=backend)
    return fn(flat, ids, weights.to(values.device), num_groups, accumulate_dtype).reshape(num_groups, *rest)

"""Thin binding to ``fedhpc._cuda.subspace_similarity`` (csrc/).

The extension computes ‖U_iᵀV_j‖_F² / r for equal-width float32 bases; ranks are
applied here by zeroing padded columns (and zero-padding the narrower input) before
the call, then rescaling by r / min(r_i, r_j).
"""
from __future__ import annotations

import torch

from ..dispatch import cuda_extension
from .reference import mask_columns, normalise


def similarity_cuda(U: torch.Tensor, V: torch.Tensor | None,
                    ranks_u: torch.Tensor, ranks_v: torch.Tensor) -> torch.Tensor:
    """Same contract as ``similarity_reference`` for CUDA tensors; float32 output."""
    U = mask_columns(U.float(), ranks_u)
    V = U if V is None else mask_columns(V.float(), ranks_v)
    r = max(U.shape[-1], V.shape[-1])
    U, V = (torch.nn.functional.pad(T, (0, r - T.shape[-1])).contiguous() for T in (U, V))
    return normalise(cuda_extension().subspace_similarity(U, V) * r, ranks_u, ranks_v)

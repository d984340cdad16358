"""Thin binding to ``fedhpc._cuda.subspace_similarity`` (csrc/subspace_similarity.cu).

The extension computes ‖U_iᵀV_j‖_F² / r for equal-width float32 bases, and only the
upper triangle when handed the same tensor twice. Ranks are applied here by
zeroing padded columns (and zero-padding the narrower input) before the call,
then rescaling by r / min(r_i, r_j).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dispatch import cuda_extension
from .reference import mask_columns, normalise


def similarity_cuda(U: torch.Tensor, V: torch.Tensor | None,
                    ranks_u: torch.Tensor, ranks_v: torch.Tensor) -> torch.Tensor:
    """Same contract as ``similarity_reference`` for CUDA tensors; float32 output."""
    r = U.shape[-1] if V is None else max(U.shape[-1], V.shape[-1])
    U = F.pad(mask_columns(U.float(), ranks_u), (0, r - U.shape[-1])).contiguous()
    V = U if V is None else F.pad(mask_columns(V.float(), ranks_v), (0, r - V.shape[-1])).contiguous()
    return normalise(cuda_extension().subspace_similarity(U, V) * r, ranks_u, ranks_v)

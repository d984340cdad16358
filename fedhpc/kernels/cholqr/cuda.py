"""Thin binding to ``fedhpc._cuda.cholqr2`` (csrc/cholqr2.cu), with the shared fallback rule.

The extension applies the reference's acceptance test (``TOLERANCE``) in-kernel and
returns a per-matrix ``ok`` flag; rejected matrices come back zero and are
refactored here by Householder QR, exactly as on the other backends.
"""
from __future__ import annotations

import torch

from ..dispatch import cuda_extension
from .reference import TOLERANCE, finish_with_fallback


def cholqr2_cuda(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``cholqr2_reference`` for CUDA tensors; computes in float32."""
    X = X.float().contiguous()
    Q, R, ok = cuda_extension().cholqr2(X, tolerance=TOLERANCE)
    return finish_with_fallback(X, Q, R, ok)

"""Thin binding to ``fedhpc._cuda.cholqr2`` (csrc/), with the shared fallback rule.

The extension returns (Q, R) without a per-matrix status, so acceptance is checked
here a posteriori: one batched Gram of Q (an extra read of Q) must be within
``TOLERANCE`` of the identity and R finite; rejected matrices go to Householder.
"""
from __future__ import annotations

import torch

from ..dispatch import cuda_extension
from .reference import TOLERANCE, finish_with_fallback


def cholqr2_cuda(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``cholqr2_reference`` for CUDA tensors; computes in float32."""
    X = X.float().contiguous()
    Q, R = cuda_extension().cholqr2(X)
    eye = torch.eye(X.shape[-1], dtype=Q.dtype, device=Q.device)
    drift = (Q.mT @ Q - eye).abs().amax(dim=(-2, -1))
    ok = (drift <= TOLERANCE) & R.isfinite().all(dim=(-2, -1))
    return finish_with_fallback(X, Q, R, ok)

"""Batched orthonormalisation of tall-skinny matrices: X = Q R (CholeskyQR2 + fallback)."""
from __future__ import annotations

import torch

from ..dispatch import Backend, Impl, select

__all__ = ["orthonormalize"]

MAX_KERNEL_RANK = 64
"""Largest r for the Triton/CUDA kernels: the r x r Gram and R⁻¹ tiles live in registers."""


def _kernel_limits(X: torch.Tensor) -> str | None:
    """Triton/CUDA compute in float32 (float64 callers want float64 accuracy), r <= 64."""
    if X.dtype == torch.float64:
        return "computes in float32 only; float64 input goes to torch"
    if X.shape[-1] > MAX_KERNEL_RANK:
        return f"r={X.shape[-1]} exceeds the kernel limit {MAX_KERNEL_RANK}"
    return None


IMPLS = (
    Impl("cuda", f"{__name__}.cuda", "cholqr2_cuda", _kernel_limits),
    Impl("triton", f"{__name__}.triton", "cholqr2_triton", _kernel_limits),
    Impl("torch", f"{__name__}.reference", "cholqr2_reference"),
)


def orthonormalize(X: torch.Tensor, *, backend: Backend | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis and triangular factor of each matrix in a batch.

    Args:
        X: ``[..., d, r]`` with d >= r; float32 or float64 (16-bit inputs are upcast to float32).
        backend: force "cuda", "triton" or "torch" (default: ``FEDHPC_KERNELS`` or automatic).

    Returns:
        Q ``[..., d, r]`` with orthonormal columns spanning X, and upper-triangular
        R ``[..., r, r]`` with diag(R) >= 0 and X = Q R, both in float32 (float64 for
        float64 input). Ill-conditioned, rank-deficient or zero matrices are
        factored by Householder QR: Q stays orthonormal (dependent columns get
        arbitrary orthonormal completions) and R gets zero rows; never NaN for
        finite input.
    """
    if not isinstance(X, torch.Tensor) or X.ndim < 2:
        raise ValueError(f"X must be a tensor [..., d, r], got {type(X).__name__} "
                         f"of shape {tuple(getattr(X, 'shape', ()))}")
    *batch, d, r = X.shape
    if d < r or r < 1:
        raise ValueError(f"X must be tall with d >= r >= 1, got [..., d={d}, r={r}]")
    if not X.is_floating_point():
        raise ValueError(f"X must be floating point, got {X.dtype}")
    if X.dtype not in (torch.float32, torch.float64):
        X = X.float()
    X3 = X.reshape(-1, d, r)
    if X3.shape[0] == 0:
        return X.new_empty(*batch, d, r), X.new_empty(*batch, r, r)
    Q, R = select("orthonormalize", IMPLS, X3, backend=backend)(X3)
    return Q.reshape(*batch, d, r), R.reshape(*batch, r, r)

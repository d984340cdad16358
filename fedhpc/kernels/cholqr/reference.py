"""CholeskyQR2 in plain torch, with a per-matrix Householder fallback.

CholeskyQR (Gram, r x r Cholesky, triangular solve) is all GEMM and batches well;
Householder QR (``torch.linalg.qr``) loops over the batch on CUDA and is 2-6x slower
on CPU for tall-skinny matrices (kernels_hpc.md §1.1). One CholeskyQR pass loses
orthogonality like u·κ(X)²; the second pass, applied to the nearly orthonormal
Q₁, restores it to O(u) provided ‖Q₁ᵀQ₁ − I‖ is well below 1 (Yamamoto et al.,
ETNA 44, 2015). That quantity is our per-matrix condition estimate: with
``TOLERANCE = 0.1`` CholeskyQR2 is trusted up to κ(X) ≈ 1e3 in float32 and ≈ 3e7
in float64. Matrices that fail (Cholesky breakdown, non-finite values, rank
deficiency) are redone by Householder QR, whose Q is orthonormal for any input.

The Triton and CUDA paths reuse ``cholesky_inverse_factors`` and
``finish_with_fallback`` so that all backends share one acceptance rule.
"""
from __future__ import annotations

import torch

TOLERANCE = 0.1
"""Largest accepted max|Q₁ᵀQ₁ − I| after the first pass (≈ u·κ(X)²)."""


def householder(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin Householder QR of ``X [b, d, r]`` with diag(R) >= 0, the sign CholeskyQR gives.

    Zero or dependent columns get arbitrary orthonormal completions in Q and zero rows in R.
    """
    Q, R = torch.linalg.qr(X)
    sign = torch.where(R.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(X.dtype)
    return Q * sign[:, None, :], R * sign[:, :, None]


def cholesky_inverse_factors(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor R of ``G [b, r, r]``, its inverse W = R⁻¹, and a success mask [b].

    Explicit W turns the triangular solve into a GEMM (faster on CPU, a tl.dot on GPU).
    Failed matrices carry garbage; callers mask them out.
    """
    R, info = torch.linalg.cholesky_ex(G, upper=True)
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device).expand_as(G)
    W = torch.linalg.solve_triangular(R, eye, upper=True)
    return R, W, info == 0


def accepted(ok1: torch.Tensor, ok2: torch.Tensor, G2: torch.Tensor) -> torch.Tensor:
    """Per-matrix acceptance: both Cholesky steps succeeded and Q₁ was nearly orthonormal."""
    eye = torch.eye(G2.shape[-1], dtype=G2.dtype, device=G2.device)
    drift = (G2 - eye).abs().amax(dim=(-2, -1))
    return ok1 & ok2 & (drift <= TOLERANCE)  # NaN drift compares False: rejected


def finish_with_fallback(X: torch.Tensor, Q: torch.Tensor, R: torch.Tensor,
                         ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the rejected matrices of (Q, R) by their Householder QR."""
    bad = (~ok).nonzero().flatten()  # host sync: the fallback batch size is data-dependent
    if bad.numel():
        Qh, Rh = householder(X[bad])
        Q[bad], R[bad] = Qh, Rh
    return Q, R


def cholqr2_reference(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q [b, d, r], R [b, r, r] with X = Q R for ``X [b, d, r]`` (float32 or float64)."""
    R1, W1, ok1 = cholesky_inverse_factors(X.mT @ X)
    Q1 = X @ W1
    G2 = Q1.mT @ Q1
    R2, W2, ok2 = cholesky_inverse_factors(G2)
    Q, R = Q1 @ W2, R2 @ R1
    return finish_with_fallback(X, Q, R, accepted(ok1, ok2, G2))

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

On the CPU the batch is processed in blocks of ``BLOCK_BYTES``: each block runs both
passes while it is cache-resident, so X is read from memory once, Q written once, and
Q₁ lives in one reused block-sized buffer. Unblocked, Q₁ was a second batch-sized
allocation whose fresh pages the kernel faulted in and zeroed on every call (1.6k-6.7k
minor faults per call at [256, 768, 16], against ~200 blocked).

The Triton and CUDA paths reuse ``cholesky_inverse_factors`` and
``finish_with_fallback`` so that all backends share one acceptance rule.
"""
from __future__ import annotations

import torch

TOLERANCE = 0.1
"""Largest accepted max|Q₁ᵀQ₁ − I| after the first pass (≈ u·κ(X)²)."""

BLOCK_BYTES = 4 << 20
"""Bytes of X per CPU block. 1-8 MiB timed alike on one thread; the larger end means fewer
bmm calls, i.e. fewer OpenMP barriers, which stall when the shared box is oversubscribed."""


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
    b, d, r = X.shape
    Q, R = X.new_empty(b, d, r), X.new_empty(b, r, r)
    ok = torch.empty(b, dtype=torch.bool, device=X.device)
    step = b if X.device.type != "cpu" else max(1, BLOCK_BYTES // (d * r * X.element_size()))
    Q1 = X.new_empty(min(step, b), d, r)                  # reused for every block
    for i in range(0, b, step):
        j = min(b, i + step)
        Xi, Q1i = X[i:j], Q1[:j - i]
        R1, W1, ok1 = cholesky_inverse_factors(Xi.mT @ Xi)
        torch.bmm(Xi, W1, out=Q1i)
        G2 = Q1i.mT @ Q1i
        R2, W2, ok2 = cholesky_inverse_factors(G2)
        torch.bmm(Q1i, W2, out=Q[i:j])
        torch.bmm(R2, R1, out=R[i:j])
        ok[i:j] = accepted(ok1, ok2, G2)
    return finish_with_fallback(X, Q, R, ok)

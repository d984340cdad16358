"""Rank-k truncated SVD of M = Σ_k w_k B_k A_k through the factors, never forming M.

With the stacked factors Bw = [w_1B_1 … w_KB_K] ``[d_out, R]`` and At = [A_1; …; A_K]ᵀ
``[d_in, R]`` (R = Σ r_k), M = Bw Atᵀ. Two methods (kernels_hpc.md §1.3):

exact       Bw = Q_b R_b, At = Q_a R_a (orthonormalize), SVD of the R x R core R_b R_aᵀ
            in float64; U = Q_b U_c, Vh = V_cᵀ Q_aᵀ. Cost ≈ 4R²(d_out + d_in) + 22R³.
randomized  Halko et al. 2011 (Alg. 4.4) on the implicit operator: Y = Bw (Atᵀ Ω) with
            Ω ``[d_in, l]``, l = k + oversample, then q power iterations
            Q ← orth(M orth(Mᵀ Q)), and the SVD of the small l x d_in matrix QᵀM.
            Each application of M or Mᵀ costs 2R(d_out + d_in)·l, so the total,
            ≈ (2q + 2)·2R(d_out + d_in)·l, is linear in R.

Every orthonormalisation goes through the ``orth`` callable handed in (the
dispatched ``orthonormalize``), so the GPU path uses the fused CholeskyQR2 kernels.
Batched over any leading dims (layers of equal shape).
"""
from __future__ import annotations

from typing import Callable

import torch

Orth = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

EXACTNESS_PREMIUM = 4.0
"""``auto`` keeps the exact method until it is estimated this many times costlier."""


def prefer_randomized(R: int, d_out: int, d_in: int, sketch: int, power_iters: int) -> bool:
    """The ``auto`` rule from the flop counts above; true as R approaches min(d_out, d_in)."""
    if sketch >= R:
        return False
    exact = 4 * R * R * (d_out + d_in) + 22 * R ** 3
    randomized = (2 * power_iters + 2) * 2 * R * (d_out + d_in) * sketch
    return exact > EXACTNESS_PREMIUM * randomized


def _tall_qr(X: torch.Tensor, orth: Orth) -> tuple[torch.Tensor, torch.Tensor]:
    """Q, R of ``X [.., d, R]``; wide inputs (R > d) get Householder's square Q."""
    return orth(X) if X.shape[-2] >= X.shape[-1] else torch.linalg.qr(X)


def exact_svd(Bw: torch.Tensor, At: torch.Tensor, rank: int, orth: Orth):
    """U ``[.., d_out, rank]``, S ``[.., rank]``, Vh ``[.., rank, d_in]`` of Bw Atᵀ."""
    Qb, Rb = _tall_qr(Bw, orth)
    Qa, Ra = _tall_qr(At, orth)
    Uc, S, Vch = torch.linalg.svd(Rb.double() @ Ra.double().mT, full_matrices=False)
    dtype = Bw.dtype
    return Qb @ Uc[..., :rank].to(dtype), S[..., :rank].to(dtype), Vch[..., :rank, :].to(dtype) @ Qa.mT


def randomized_svd(Bw: torch.Tensor, At: torch.Tensor, rank: int, orth: Orth, *,
                   sketch: int, power_iters: int, seed: int):
    """Randomized range finder through the factors; ``sketch`` = rank + oversampling columns."""
    *batch, d_in, _ = At.shape
    gen = torch.Generator(device=At.device).manual_seed(seed)
    omega = torch.randn(*batch, d_in, sketch, generator=gen, dtype=At.dtype, device=At.device)
    Q = orth(Bw @ (At.mT @ omega))[0]                          # range of M Ω    [.., d_out, l]
    for _ in range(power_iters):                               # re-orthonormalise each half-step
        Z = orth(At @ (Bw.mT @ Q))[0]                          # Mᵀ Q           [.., d_in, l]
        Q = orth(Bw @ (At.mT @ Z))[0]                          # M Z            [.., d_out, l]
    small = (Q.mT @ Bw) @ At.mT                                # Qᵀ M           [.., l, d_in]
    Us, S, Vh = torch.linalg.svd(small.double(), full_matrices=False)
    dtype = Bw.dtype
    return Q @ Us[..., :rank].to(dtype), S[..., :rank].to(dtype), Vh[..., :rank, :].to(dtype)

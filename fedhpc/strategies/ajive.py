"""AJIVE: the joint row subspace of data blocks that observe the same rows.

Feng, Jiang, Hannig, Marron, "Angle-based joint and individual variation explained", Journal of
Multivariate Analysis 166 (2018). FedGaLore's server uses it on the clients' projected second
moments (algorithms.md §7.4 [reconstructed]): block k is X_k = √V_k `[m, c]`, whose m rows are the
original coordinates every client shares and whose c columns are the client's own projected
directions, so only the row space can be compared across blocks.

    1. each block's thin SVD; its first r̃ left singular vectors Ũ_k `[m, r̃]` are its signal
    2. M = [Ũ_1 … Ũ_K] `[m, K r̃]` = U_M Σ_M W_Mᵀ;  σ_i² ≤ K, with σ_i² = K iff every block holds u_i
    3. joint rank r_J = #{i : σ_i² > θ}:
         fixed  θ = K − δ
         wedin  θ = max(5th percentile of K − Σ_k sin²θ_k,  95th percentile of the largest σ² of K random
                 r̃-dimensional subspaces), where sin θ_k, the Wedin bound on block k's signal-subspace
                 angle, is resampled as min(1, max(‖X_kᵀ U_⊥ Q‖, ‖X_k V_⊥ Q'‖) / σ_r̃(X_k)) with Q, Q'
                 random r̃-dimensional directions inside the complements U_⊥, V_⊥ of the signal
    4. the joint basis U_J = U_M[:, :r_J]; block k's joint part is U_J U_Jᵀ X_k

The resampling follows the published AJIVE code's scheme (random directions in the estimated noise
space, 5 % / 95 % quantiles); `samples` draws of every bound are batched into one SVD call each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["Joint", "ajive", "joint_profile"]

WEDIN_QUANTILE = 0.05
"""Quantile of the resampled Wedin bound on σ² used as the cut (AJIVE's default)."""
RANDOM_QUANTILE = 0.95
"""Quantile of the random-direction bound (AJIVE's default)."""


@dataclass
class Joint:
    """What AJIVE found in one set of blocks."""
    basis: torch.Tensor
    """`[m, r_J]` float64 orthonormal joint basis."""
    sv2: torch.Tensor
    """`[min(m, K r̃)]` squared singular values of the stacked signal bases, descending."""
    threshold: float
    """The cut θ on `sv2`."""

    @property
    def rank(self) -> int:
        return self.basis.shape[1]


def ajive(blocks: torch.Tensor, *, signal_rank: int, threshold: Literal["fixed", "wedin"] = "fixed",
          delta: float = 1.0, samples: int = 1000, generator: torch.Generator | None = None) -> Joint:
    """The joint row subspace of `blocks` `[K, m, c]` (computed in float64).

    Args:
        signal_rank: r̃, signal components kept per block (at most min(m, c)).
        threshold: "fixed" (θ = K − delta) or "wedin" (resampled Wedin and random-direction bounds).
        delta: δ of the fixed cut.
        samples: resamples of each bound for "wedin".
        generator: the random stream of the resamples.
    """
    if blocks.ndim != 3:
        raise ValueError(f"blocks must be [K, m, c], got {tuple(blocks.shape)}")
    if threshold not in ("fixed", "wedin"):
        raise ValueError(f"threshold must be 'fixed' or 'wedin', got {threshold!r}")
    K, m, c = blocks.shape
    rank = min(signal_rank, m, c)
    if rank < 1:
        raise ValueError(f"signal_rank must be >= 1, got {signal_rank}")
    X = blocks.double()
    U, S, Vh = torch.linalg.svd(X, full_matrices=True)                      # [K, m, m], [K, min], [K, c, c]
    stacked = U[:, :, :rank].permute(1, 0, 2).reshape(m, K * rank)           # [m, K r̃]
    U_M, S_M, _ = torch.linalg.svd(stacked, full_matrices=False)
    sv2 = S_M.square()
    if threshold == "fixed":
        theta = K - delta
    else:
        theta = max(_wedin_cut(X, U, S, Vh, rank, samples, generator),
                    _random_direction_cut(K, m, rank, samples, generator))
    joint_rank = int((sv2 > theta).sum())
    return Joint(U_M[:, :joint_rank], sv2, float(theta))


def joint_profile(blocks: torch.Tensor, weights: torch.Tensor, joint: Joint) -> torch.Tensor:
    """`[m]` Σ_k weights_k · (row means over c of (U_J U_Jᵀ X_k)²), float64: the per-row second
    moment of the joint signal (FedGaLore's synchronised profile ṽ)."""
    X = blocks.double()
    parts = joint.basis @ (joint.basis.T @ X)                               # [K, m, c]
    return torch.tensordot(weights.double(), parts.square().mean(-1), dims=1)


def _random_subspaces(count: tuple[int, ...], dim: int, rank: int, generator) -> torch.Tensor:
    """`[*count, dim, rank]` orthonormal bases of uniformly random subspaces."""
    gauss = torch.randn(*count, dim, rank, generator=generator, dtype=torch.float64)
    return torch.linalg.qr(gauss).Q


def _sampled_norms(data: torch.Tensor, complement: torch.Tensor, rank: int, samples: int, generator) -> torch.Tensor:
    """`[samples, K]` ‖data_k D‖₂ for D a random `rank`-dim subspace of each complement `[K, b, d]`."""
    K, _, d = complement.shape
    if min(rank, d) == 0:
        return torch.zeros(samples, K, dtype=torch.float64)
    Q = _random_subspaces((samples, K), d, min(rank, d), generator)         # [samples, K, d, k]
    return torch.linalg.matrix_norm(data @ (complement @ Q), ord=2)


def _wedin_cut(X, U, S, Vh, rank, samples, generator) -> float:
    """5th percentile of K − Σ_k sin²θ_k over resampled Wedin bounds."""
    K = X.shape[0]
    u_norms = _sampled_norms(X.mT, U[:, :, rank:], rank, samples, generator)       # ‖X_kᵀ U_⊥ Q‖
    v_norms = _sampled_norms(X, Vh[:, rank:, :].mT, rank, samples, generator)      # ‖X_k V_⊥ Q'‖
    sigma = S[:, rank - 1].clamp(min=torch.finfo(torch.float64).tiny)
    sin = (torch.maximum(u_norms, v_norms) / sigma).clamp(max=1.0)
    bound = K - sin.square().sum(1)
    return float(torch.quantile(bound, WEDIN_QUANTILE))


def _random_direction_cut(K: int, m: int, rank: int, samples: int, generator) -> float:
    """95th percentile of the largest σ² of K stacked random `rank`-dim subspaces of R^m."""
    bases = _random_subspaces((samples, K), m, rank, generator)             # [samples, K, m, r̃]
    stacked = bases.permute(0, 2, 1, 3).reshape(samples, m, K * rank)
    top = torch.linalg.matrix_norm(stacked, ord=2).square()
    return float(torch.quantile(top, RANDOM_QUANTILE))

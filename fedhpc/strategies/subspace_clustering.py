"""LoRA-Subspace Adaptive Clustering (LSAC): clients grouped by the column spaces of their LoRA B.

HiLoRA (algorithms.md §3.3, Appendix B). Per client i and adapted matrix m, U_i^m is an
orthonormal basis of the client's (EMA-smoothed) B; then

    d_ij = mean_m [1 - ||U_i^mᵀ U_j^m||_F² / r]          (1 - mean cos² of the principal angles)
    S_ij = exp(-d_ij² / (2 σ²))                          (σ: median off-diagonal d_ij unless given)
    L    = I - D^-1/2 S D^-1/2 ,  eigenvalues μ_1 <= μ_2 <= ...
    K*   = argmax_{K in [k_min, k_max]} (μ_{K+1} - μ_K)   (eigengap)
    j(i) = SpectralClustering(K*, affinity=S)

A new client is routed to the cluster whose basis is most similar to its probe's basis.
Pure functions of tensors, the same on every rank for the same input.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..kernels import orthonormalize, subspace_similarity

__all__ = ["Clustering", "bases", "subspace_distance", "gaussian_affinity", "eigengap_count", "cluster_clients",
           "route"]


@dataclass(frozen=True)
class Clustering:
    labels: np.ndarray
    """`[N]` cluster id per client, numbered by first appearance in client order."""
    count: int
    """K*, the number of clusters chosen by the eigengap."""
    distance: np.ndarray
    """`[N, N]` subspace distances d_ij."""
    affinity: np.ndarray
    """`[N, N]` Gaussian affinities S_ij."""


def bases(B: torch.Tensor) -> torch.Tensor:
    """Orthonormal bases `[N, p, r]` of the column spaces of `B [N, p, r]` (float64)."""
    return orthonormalize(B.double())[0]


def subspace_distance(per_matrix: list[torch.Tensor]) -> np.ndarray:
    """d_ij = mean over matrices of 1 - subspace similarity, for bases `[N, p_m, r]` per matrix."""
    sims = torch.stack([subspace_similarity(U) for U in per_matrix]).mean(0)
    d = (1.0 - sims).clamp_min(0.0).numpy()
    np.fill_diagonal(d, 0.0)
    return d


def gaussian_affinity(d: np.ndarray, sigma: float = 0.0) -> np.ndarray:
    """S = exp(-d² / 2σ²); σ <= 0 takes the median off-diagonal distance (1 if all are 0)."""
    if sigma <= 0:
        off = d[~np.eye(len(d), dtype=bool)]
        off = off[off > 0]
        sigma = float(np.median(off)) if off.size else 1.0
    return np.exp(-np.square(d) / (2.0 * sigma ** 2))


def eigengap_count(S: np.ndarray, k_min: int, k_max: int) -> int:
    """K in [k_min, min(k_max, N - 1)] with the largest gap μ_{K+1} - μ_K of the normalised
    Laplacian of S; 1 when fewer than k_min + 1 clients."""
    from scipy.sparse.csgraph import laplacian

    mu = np.sort(np.linalg.eigvalsh(laplacian(S, normed=True)))
    ks = range(k_min, min(k_max, len(mu) - 1) + 1)
    if not ks:
        return 1
    return max(ks, key=lambda k: mu[k] - mu[k - 1])  # 0-based: mu[k] = μ_{k+1}


def _first_appearance(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 0, 1, ... in order of first appearance (independent of sklearn's ids)."""
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    remap = np.empty(len(order), dtype=np.int64)
    remap[np.unique(labels)[order]] = np.arange(len(order))
    return remap[labels]


def cluster_clients(per_matrix_B: list[torch.Tensor], *, k_min: int, k_max: int, sigma: float = 0.0,
                    seed: int = 0) -> Clustering:
    """LSAC on each client's B, given per adapted matrix as `[N, p_m, r]` (rows: clients)."""
    from sklearn.cluster import SpectralClustering

    d = subspace_distance([bases(B) for B in per_matrix_B])
    S = gaussian_affinity(d, sigma)
    count = eigengap_count(S, k_min, k_max)
    if count == 1:
        labels = np.zeros(len(d), dtype=np.int64)
    else:
        labels = SpectralClustering(n_clusters=count, affinity="precomputed", random_state=seed).fit_predict(S)
    return Clustering(_first_appearance(np.asarray(labels)), count, d, S)


def route(probe_B: list[torch.Tensor], cluster_B: list[torch.Tensor]) -> torch.Tensor:
    """`[C]` index of the cluster whose basis is most similar to each probe, averaged over
    matrices: argmax_j mean_m ||U_u^mᵀ U_j^m||_F² / r. Probes `[C, p_m, r]`, clusters `[K, p_m, r]`."""
    sims = torch.stack([subspace_similarity(bases(P), bases(Q)) for P, Q in zip(probe_B, cluster_B)]).mean(0)
    return sims.argmax(dim=1)

"""LoRA-Subspace Adaptive Clustering (LSAC): clients grouped by the column spaces of their LoRA B.

HiLoRA (algorithms.md §3.3, Appendix B). Per client i and adapted matrix m, U_i^m is an
orthonormal basis of the client's (EMA-smoothed) B; then

    d_ij = mean_m [1 - ||U_i^mᵀ U_j^m||_F² / r]          (1 - mean cos² of the principal angles)
    S_ij = exp(-d_ij² / (2 σ²))                          (σ: `sigma_scale` x median off-diagonal d_ij unless given)
           kept only between k nearest neighbours when `neighbors` = k > 0
    L    = I - D^-1/2 S D^-1/2 ,  eigenvalues μ_1 <= μ_2 <= ...
    K*   = argmax_{K in [k_min, k_max]} (μ_{K+1} - μ_K)   (eigengap)
    j(i) = SpectralClustering(K*, affinity=S)

`similarity="cosine"` replaces the principal angles by the signed cosine of the statistics
themselves, d_ij = 1 - mean_m <E_i^m, E_j^m>_F / (||E_i^m|| ||E_j^m||), where E is B or, for
the `update_product` statistic, the low-rank product B A (computed through r x r Grams).

What each client contributes (`client_statistic`): an EMA over the root rounds of its trained
B [PN], of its change of B, or of its change of the product B A (kept as rank-2r factors).

A new client is routed to the cluster whose basis is most similar to its probe's basis.
Pure functions of tensors, the same on every rank for the same input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..kernels import lowrank_aggregate, orthonormalize, subspace_similarity

__all__ = ["Clustering", "Statistic", "client_statistic", "bases", "subspace_distance", "cosine_distance",
           "gaussian_affinity", "eigengap_count", "cluster_clients", "route"]

Source = Literal["trained_B", "update_B", "update_product"]
Similarity = Literal["subspace", "cosine"]


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


@dataclass(frozen=True)
class Statistic:
    """One client's EMA statistic on one adapted matrix, batched over clients."""
    B: torch.Tensor
    """`[C, p, q]`: the EMA of B (q = r), or the left factor of the EMA product (q = 2r)."""
    A: torch.Tensor | None = None
    """`[C, q, d_in]`: the right factor of the EMA product; None for B statistics."""


def _frobenius(B: torch.Tensor, A: torch.Tensor | None) -> torch.Tensor:
    """`[C]` ||B A||_F (or ||B||_F) through q x q Grams, never forming B A."""
    if A is None:
        return B.flatten(1).norm(dim=1)
    gram = (B.mT @ B) * (A @ A.mT).mT
    return gram.sum((1, 2)).clamp_min(0).sqrt()


def client_statistic(source: Source, ema: Statistic, decay: float, trained_B: torch.Tensor,
                     trained_A: torch.Tensor, root_B: torch.Tensor, root_A: torch.Tensor) -> Statistic:
    """EMA step `decay * ema + (1 - decay) * x / ||x||_F` after one root round, where x is the
    trained B [PN], its change B' - B_r, or the change of the product B'A' - B_r A_r. The product
    EMA stays a rank-2r factor pair: the sum is truncated by `lowrank_aggregate` (exact)."""
    if source != "update_product":
        x = trained_B - root_B if source == "update_B" else trained_B
        return Statistic(decay * ema.B + (1 - decay) * x / _frobenius(x, None).clamp_min(1e-12).view(-1, 1, 1))
    r = trained_B.shape[-1]
    root_B, root_A = root_B.expand_as(trained_B), root_A.expand_as(trained_A)
    scale = (1 - decay) / _frobenius(torch.cat([trained_B, -root_B], -1),
                                     torch.cat([trained_A, root_A], -2)).clamp_min(1e-12).view(-1, 1, 1)
    Bs = torch.stack([decay * ema.B[..., :r], decay * ema.B[..., r:], scale * trained_B, -scale * root_B], 1)
    As = torch.stack([ema.A[:, :r], ema.A[:, r:], trained_A, root_A], 1)
    U, S, Vh = lowrank_aggregate(Bs.double(), As.double(), torch.ones(4, dtype=torch.float64), rank=2 * r,
                                 method="exact")
    return Statistic((U * S[:, None, :]).to(ema.B.dtype), Vh.to(ema.A.dtype))


def bases(B: torch.Tensor) -> torch.Tensor:
    """Orthonormal bases `[N, p, r]` of the column spaces of `B [N, p, r]` (float64)."""
    return orthonormalize(B.double())[0]


def subspace_distance(per_matrix: list[torch.Tensor]) -> np.ndarray:
    """d_ij = mean over matrices of 1 - subspace similarity, for bases `[N, p_m, r]` per matrix."""
    sims = torch.stack([subspace_similarity(U) for U in per_matrix]).mean(0)
    d = (1.0 - sims).clamp_min(0.0).numpy()
    np.fill_diagonal(d, 0.0)
    return d


def _inner_products(X: Statistic, Y: Statistic, block: int = 64) -> torch.Tensor:
    """`[N, M]` <E_i, F_j>_F in float64 for E in X, F in Y, `block` rows at a time (the Grams are
    [block, M, q, q])."""
    B, C = X.B.double(), Y.B.double()
    rows = []
    for lo in range(0, len(B), block):
        gram = torch.einsum("ipq,jps->ijqs", B[lo:lo + block], C)
        if X.A is None:
            rows.append(gram.diagonal(dim1=2, dim2=3).sum(-1))
        else:
            rows.append((gram * torch.einsum("iqd,jsd->ijqs", X.A.double()[lo:lo + block], Y.A.double())).sum((2, 3)))
    return torch.cat(rows)


def _cosines(X: Statistic, Y: Statistic) -> torch.Tensor:
    """`[N, M]` cosines of the statistics of X and Y (B, or B A through Grams)."""
    norm_x = _frobenius(X.B.double(), None if X.A is None else X.A.double())
    norm_y = _frobenius(Y.B.double(), None if Y.A is None else Y.A.double())
    return _inner_products(X, Y) / (norm_x[:, None] * norm_y[None, :]).clamp_min(1e-300)


def cosine_distance(per_matrix: list[Statistic]) -> np.ndarray:
    """d_ij = 1 - mean over matrices of the cosine of E_i and E_j (E = B, or B A through Grams)."""
    d = (1.0 - torch.stack([_cosines(stat, stat) for stat in per_matrix]).mean(0)).clamp_min(0.0).numpy()
    np.fill_diagonal(d, 0.0)
    return d


def gaussian_affinity(d: np.ndarray, sigma: float = 0.0, neighbors: int = 0, sigma_scale: float = 1.0) -> np.ndarray:
    """S = exp(-d² / 2σ²); σ <= 0 takes `sigma_scale` x the median off-diagonal distance (1 if all are 0).
    With most pairs in different clusters the median is an across-cluster distance, so at scale 1
    a within-cluster pair is barely closer than the rest; a scale below 1 sharpens the contrast.

    `neighbors` = k > 0 keeps S_ij only where j is among i's k nearest clients or i among j's
    (the symmetric k-nearest-neighbour graph). With noisy bases every distance sits near the
    median, the dense kernel is nearly flat and its eigengap sees no clusters; the k-NN graph
    keeps only the within-cluster edges that stand out."""
    if sigma <= 0:
        off = d[~np.eye(len(d), dtype=bool)]
        off = off[off > 0]
        sigma = sigma_scale * float(np.median(off)) if off.size else 1.0
    S = np.exp(-np.square(d) / (2.0 * sigma ** 2))
    if 0 < neighbors < len(d) - 1:
        ranked = np.argsort(d + np.diag(np.full(len(d), np.inf)), axis=1, kind="stable")[:, :neighbors]
        near = np.zeros(d.shape, dtype=bool)
        np.put_along_axis(near, ranked, True, axis=1)
        S = np.where(near | near.T | np.eye(len(d), dtype=bool), S, 0.0)
    return S


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


def cluster_clients(per_matrix: list[Statistic], *, k_min: int, k_max: int, similarity: Similarity = "subspace",
                    sigma: float = 0.0, sigma_scale: float = 1.0, neighbors: int = 0, seed: int = 0) -> Clustering:
    """LSAC on each client's statistic, given per adapted matrix with clients as rows. The
    subspace similarity compares the column spaces of the statistics' B."""
    from sklearn.cluster import SpectralClustering

    if similarity == "cosine":
        d = cosine_distance(per_matrix)
    else:
        d = subspace_distance([bases(stat.B) for stat in per_matrix])
    S = gaussian_affinity(d, sigma, neighbors, sigma_scale)
    count = eigengap_count(S, k_min, k_max)
    if count == 1:
        labels = np.zeros(len(d), dtype=np.int64)
    else:
        labels = SpectralClustering(n_clusters=count, affinity="precomputed", random_state=seed).fit_predict(S)
    return Clustering(_first_appearance(np.asarray(labels)), count, d, S)


def route(probe: list[Statistic], clusters: list[Statistic], similarity: Similarity = "subspace") -> torch.Tensor:
    """`[C]` index of the cluster most similar to each probe, averaged over matrices, by the
    similarity the clusters were found with: mean_m ||U_u^mᵀ U_j^m||_F² / r between the column
    spaces of B, or the cosine of the statistics. Probes `[C, ...]`, clusters `[K, ...]` per matrix."""
    if similarity == "cosine":
        sims = torch.stack([_cosines(P, Q) for P, Q in zip(probe, clusters)]).mean(0)
    else:
        sims = torch.stack([subspace_similarity(bases(P.B), bases(Q.B)) for P, Q in zip(probe, clusters)]).mean(0)
    return sims.argmax(dim=1)

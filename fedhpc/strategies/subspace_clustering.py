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

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..kernels import lowrank_aggregate, orthonormalize, subspace_similarity

__all__ = ["Clustering", "Statistic", "client_statistic", "bases", "subspace_distance", "cosine_distance",
           "gaussian_affinity", "eigengap_count", "cluster_clients", "route", "project_statistics", "cluster_projected",
           "SketchedClustering", "cluster_clients_scalable", "principal_bases"]

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


# --- the scalable path: projected statistics, a sparse k-NN graph, sparse spectral clustering ----
# The exact path compares every pair of clients on every matrix (N² Grams of p x r): about 10
# minutes at 10³ clients and most of a day at 10⁴ on one thread. The scalable path
#
#   1. projects each client's statistic on matrix m from p to `width` rows by G_m: by default the
#      leading principal directions of a seeded sample of the clients' B (`principal_bases`),
#      which keep the clusters' shared subspaces and drop most of the isotropic noise; or a shared
#      Gaussian map (Johnson-Lindenstrauss; keyed by (seed, m)), which keeps inner products only
#      to ±1/√width of the norms, too coarse for noisy statistics. Principal angles are taken
#      between the column spaces of G_mᵀ B (an orthonormal basis by QR, ||V_iᵀV_j||² / r),
#      cosines between G_mᵀ B (and A H_m for the product statistic);
#   2. finds each client's `candidates` (default 2 x `neighbors`) most similar clients through a
#      second, small two-sided sketch of the projected products summed over matrices (`size`²
#      numbers per client, one blocked all-pairs matrix product);
#   3. scores the candidate pairs on the projected statistics (one batched product per matrix
#      over gathered rows), keeps each client's `neighbors` best, and runs the eigengap and
#      spectral clustering on that sparse symmetric graph (ARPACK for the leading eigenvectors of
#      D^-1/2 S D^-1/2, k-means on their rows).
# Memory and the dominant cost are O(N · M · width · r) and O(N · candidates · M · width · r);
# the only N² term is step 2's product over `size`² = 1024 numbers per client (≈ 4 s at 10⁴).
# Measured at 10⁴ clients, 24 ViT-B-sized matrices: docs/results.md, "Scale".

def principal_bases(per_matrix: list[Statistic], *, width: int = 64, sample: int = 512, seed: int = 0,
                    iterations: int = 2) -> list[torch.Tensor]:
    """Per matrix m, `[p, width]` orthonormal: the leading left singular vectors of the B of a
    seeded sample of at most `sample` clients side by side (a randomized range finder with
    `iterations` power steps, keyed by (seed, m); single-threaded, so the same bits on any rank).

    Projecting on them instead of a random map (`project_statistics(bases=...)`) keeps what the
    clients' statistics share (clusters' subspaces add up across clients, isotropic noise does not)
    and drops most of the noise; a random map to `width` rows keeps inner products only to
    ±||B_i|| ||B_j|| / √width, which noisy statistics (a few % of their energy in the shared part)
    do not survive: on the planted benchmark with noise 0.5 the random map's ARI fell to ~0
    where the exact path's was 1 (docs/results.md, Scale)."""
    from ..rng import Purpose, keyed_rng, keyed_torch_generator

    n = len(per_matrix[0].B)
    rows = np.sort(keyed_rng(seed, 2, purpose=Purpose.CLUSTER_SKETCH).choice(n, size=min(n, sample), replace=False))
    out = []
    for m, stat in enumerate(per_matrix):
        B = stat.B[torch.as_tensor(rows)].float()
        p = B.shape[1]
        X = B.permute(1, 0, 2).reshape(p, -1)                         # [p, S q]
        want = min(width, p, X.shape[1])
        g = keyed_torch_generator(seed, 2 * 10 ** 6 + m, purpose=Purpose.CLUSTER_SKETCH)
        Q = torch.linalg.qr(X @ torch.randn(X.shape[1], min(want + 8, X.shape[1]), generator=g))[0]
        for _ in range(iterations):
            Q = torch.linalg.qr(X @ (X.T @ Q))[0]
        U = torch.linalg.svd(Q.T @ X, full_matrices=False)[0]
        out.append((Q @ U[:, :want]).contiguous())
    return out


def project_statistics(per_matrix: list[Statistic], *, similarity: Similarity = "subspace", width: int = 64,
                       seed: int = 0, bases: list[torch.Tensor] | None = None
                       ) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """Per matrix, (kind, L, R) float32 factors whose similarity estimates the exact path's:
        subspace  ("square"):  L = qr(G_mᵀ B) [N, width, r],   sim = ||L_iᵀ L_j||² / r
        cosine B  ("linear"):  L = G_mᵀ B / ||B||,             sim = <L_i, L_j>
        cosine BA ("product"): L = G_mᵀ B / ||B A||, R = A H_m, sim = <L_i R_i, L_j R_j>
    with G, H of N(0, 1/width) entries keyed by (seed, m), or G = `bases[m]` (`principal_bases`).
    Row i depends on client i alone (and on the bases)."""
    from ..rng import Purpose, keyed_torch_generator

    out = []
    for m, stat in enumerate(per_matrix):
        g = keyed_torch_generator(seed, m, purpose=Purpose.CLUSTER_SKETCH)
        B = stat.B.float()
        G = torch.randn(B.shape[1], width, generator=g) / math.sqrt(width) if bases is None else bases[m]
        L = (B.mT.contiguous() @ G).mT                    # G_mᵀ B as one [(N q), p] x [p, w] product
        if similarity == "subspace":
            out.append(("square", torch.linalg.qr(L)[0].contiguous(), None))
            continue
        norm = _frobenius(stat.B.double(), None if stat.A is None else stat.A.double()).clamp_min(1e-300).float()
        L = (L / norm.view(-1, 1, 1)).contiguous()
        if stat.A is None:
            out.append(("linear", L, None))
        else:
            H = torch.randn(stat.A.shape[-1], width, generator=g) / math.sqrt(width)
            out.append(("product", L, (stat.A.float() @ H).contiguous()))
    return out


def _coarse(projected, *, size: int, seed: int) -> torch.Tensor:
    """`[N, size²]`: Σ_m a two-sided sketch of each client's projected statistic (of L Lᵀ, L or
    L R) / √M, for the candidate search."""
    from ..rng import Purpose, keyed_torch_generator

    n = len(projected[0][1])
    out = torch.zeros(n, size * size)
    for m, (kind, L, R) in enumerate(projected):
        g = keyed_torch_generator(seed, 10 ** 6 + m, purpose=Purpose.CLUSTER_SKETCH)
        S = torch.randn(L.shape[1], size, generator=g) / math.sqrt(size)
        SL = torch.einsum("nwq,ws->nsq", L, S)
        if kind == "square":
            right = SL.mT / math.sqrt(L.shape[-1])
        else:
            T = torch.randn(L.shape[-1] if R is None else R.shape[-1], size, generator=g) / math.sqrt(size)
            right = T.expand(n, *T.shape) if R is None else R @ T
        out += (SL @ right).flatten(1)
    return out / math.sqrt(len(projected))


def _prepare(projected) -> list:
    """Per matrix (kind, Lᵀ `[N, q, w]` contiguous, L, R): a candidate's Lᵀ is then one gathered
    row, with no per-pair transpose copy."""
    return [(kind, L.mT.contiguous(), L, R) for kind, L, R in projected]


def _pair_similarity(projected, i: np.ndarray, j: np.ndarray, prepared: list | None = None) -> torch.Tensor:
    """mean_m sim(i, j) for rows `i [b]` against their candidates `j [b, c]` -> `[b, c]` float64
    (`prepared`: `_prepare(projected)`, to reuse across calls). Per matrix one batched product
    [b, c q, w] x [b, w, q] of the gathered Lᵀ_j with L_i, accumulated in float32."""
    b, c = j.shape
    ti, tj = torch.as_tensor(i), torch.as_tensor(j).reshape(-1)
    total = torch.zeros(b, c, dtype=torch.float64)
    for kind, Lt, L, R in prepared if prepared is not None else _prepare(projected):
        q, w = Lt.shape[1], Lt.shape[2]
        X = torch.bmm(Lt.index_select(0, tj).view(b, c * q, w), L.index_select(0, ti)).view(b, c, q, q)  # L_jᵀ L_i
        if kind == "square":
            part = X.square().sum((2, 3)) / q
        elif kind == "linear":
            part = X.diagonal(dim1=2, dim2=3).sum(-1)
        else:
            Y = torch.bmm(R.index_select(0, tj).view(b, c * q, R.shape[-1]), R.index_select(0, ti).mT)
            part = (X * Y.view(b, c, q, q)).sum((2, 3))                   # R_j R_iᵀ
        total += part.double()
    return total / len(projected)


def _neighbours(projected, *, neighbors: int, candidates: int, size: int, seed: int,
                block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Each client's `neighbors` most similar others: `candidates` by the coarse sketch (one
    blocked all-pairs product of `size`² numbers per client), then ranked on the projected
    statistics. Returns (indices, similarities) `[N, neighbors]`."""
    coarse = _coarse(projected, size=size, seed=seed)
    prepared = _prepare(projected)
    n = len(coarse)
    c = min(max(candidates, neighbors), n - 1)
    k = min(neighbors, c)
    idx = np.empty((n, k), dtype=np.int64)
    sim = np.empty((n, k), dtype=np.float64)
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        s = coarse[lo:hi] @ coarse.T
        s[torch.arange(hi - lo), torch.arange(lo, hi)] = -math.inf
        cand = torch.topk(s, c, dim=1).indices.numpy()
        fine = _pair_similarity(projected, np.arange(lo, hi), cand, prepared)
        top = torch.topk(fine, k, dim=1)
        idx[lo:hi] = np.take_along_axis(cand, top.indices.numpy(), 1)
        sim[lo:hi] = top.values.numpy()
    return idx, sim


@dataclass(frozen=True)
class SketchedClustering:
    labels: np.ndarray
    """`[N]` cluster id per client, numbered by first appearance in client order."""
    count: int
    """K*, chosen by the eigengap of the sparse graph's normalised Laplacian."""
    affinity: object
    """`[N, N]` scipy.sparse CSR: the Gaussian kernel on the symmetric k-NN graph (diagonal 1)."""


def cluster_projected(projected, *, k_min: int, k_max: int, neighbors: int = 10, candidates: int = 0,
                      sigma: float = 0.0, sigma_scale: float = 1.0, size: int = 32, seed: int = 0) -> SketchedClustering:
    """LSAC on projected statistics (`project_statistics`, clients concatenated): d_ij = 1 - sim_ij
    on the symmetric `neighbors`-NN graph, S_ij = exp(-d_ij² / 2σ²) with σ = `sigma_scale` x the
    median distance of a seeded sample of 5,000 pairs unless given, the eigengap of the
    normalised Laplacian's smallest eigenvalues, k-means on the leading eigenvectors' rows."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import eigsh
    from sklearn.cluster import KMeans

    from ..rng import Purpose, keyed_rng

    n = len(projected[0][1])
    if n <= max(k_min, 2):
        return SketchedClustering(np.zeros(n, dtype=np.int64), 1, sp.identity(n, format="csr"))
    if sigma <= 0:
        rng = keyed_rng(seed, n, purpose=Purpose.CLUSTER_SKETCH)
        i, j = rng.integers(0, n, 5000), rng.integers(0, n, 5000)
        keep = i != j
        d_pairs = (1.0 - _pair_similarity(projected, i[keep], j[keep][:, None])[:, 0]).clamp_min(0).numpy()
        d_pairs = d_pairs[d_pairs > 0]
        sigma = sigma_scale * float(np.median(d_pairs)) if d_pairs.size else 1.0
    idx, sim = _neighbours(projected, neighbors=neighbors, candidates=candidates or 2 * neighbors, size=size,
                           seed=seed)
    d = np.clip(1.0 - sim, 0.0, None)
    weights = np.exp(-np.square(d) / (2.0 * sigma ** 2))
    rows = np.repeat(np.arange(n), idx.shape[1])
    S = sp.csr_matrix((weights.ravel(), (rows, idx.ravel())), shape=(n, n))
    S = S.maximum(S.T) + sp.identity(n, format="csr")        # j among i's neighbours or i among j's
    inv = sp.diags(1.0 / np.sqrt(np.asarray(S.sum(1)).ravel()))
    want = min(k_max + 1, n - 1)
    normed = (inv @ S @ inv).tocsr()
    if n <= 1000:  # small graphs: the dense solver (ARPACK wants k well below n)
        values, vectors = np.linalg.eigh(normed.toarray())
        values, vectors = values[-want:], vectors[:, -want:]
    else:
        values, vectors = eigsh(normed, k=want, which="LA",
                                v0=keyed_rng(seed, 1, purpose=Purpose.CLUSTER_SKETCH).standard_normal(n))
    order = np.argsort(-values)
    mu, vectors = 1.0 - values[order], vectors[:, order]      # Laplacian eigenvalues ascending
    ks = range(k_min, min(k_max, want - 1) + 1)
    count = max(ks, key=lambda k: mu[k] - mu[k - 1]) if ks else 1
    if count == 1:
        return SketchedClustering(np.zeros(n, dtype=np.int64), 1, S)
    embed = vectors[:, :count] / np.linalg.norm(vectors[:, :count], axis=1, keepdims=True).clip(1e-12)
    labels = KMeans(n_clusters=count, n_init=10, random_state=seed).fit_predict(embed)
    return SketchedClustering(_first_appearance(np.asarray(labels)), count, S)


def cluster_clients_scalable(per_matrix: list[Statistic], *, k_min: int, k_max: int,
                             similarity: Similarity = "subspace", sigma: float = 0.0, sigma_scale: float = 1.0,
                             neighbors: int = 10, seed: int = 0, width: int = 64,
                             block: int = 512, basis: Literal["principal", "gaussian"] = "principal",
                             candidates: int = 0) -> SketchedClustering:
    """`cluster_clients` for large federations: `project_statistics` (clients in blocks of
    `block`) on `principal_bases` (or a random Gaussian map), then `cluster_projected` on the
    k-NN graph (no dense kernel: `neighbors` >= 1)."""
    n = len(per_matrix[0].B)
    bases = principal_bases(per_matrix, width=width, seed=seed) if basis == "principal" else None
    parts = []
    for lo in range(0, n, block):
        part = [Statistic(s.B[lo:lo + block], None if s.A is None else s.A[lo:lo + block]) for s in per_matrix]
        parts.append(project_statistics(part, similarity=similarity, width=width, seed=seed, bases=bases))
    projected = [(parts[0][m][0], torch.cat([p[m][1] for p in parts]), None if parts[0][m][2] is None else
                  torch.cat([p[m][2] for p in parts])) for m in range(len(per_matrix))]
    return cluster_projected(projected, k_min=k_min, k_max=k_max, neighbors=max(1, neighbors), sigma=sigma,
                             sigma_scale=sigma_scale, seed=seed, candidates=candidates)

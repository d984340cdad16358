"""FedTreeLoRA's client tree: per-layer distances, one agglomerative tree, a cut per layer.

Spec: algorithms.md §6.4 (Phase 1) and Appendix B. With B_{l,i} client i's LoRA B matrices of
layer l side by side,

    D⁽ˡ⁾_ij = ‖B_{l,i} − B_{l,j}‖_F  (or 1 − cos)      D_glob = (1/L) Σ_l D⁽ˡ⁾
    𝒯 = agglomerative tree of D_glob (scipy `linkage`, average by default)
    c_0 = 1;  for l = 1..L, shallow to deep:
        c_l = argmax_{c_{l−1} ≤ c < min(N, c_{l−1} + K)} φ_l(c),   φ_l(1) = τ,
        φ_l(c) = silhouette of 𝒯's c-cluster cut under D⁽ˡ⁾ (sklearn, precomputed)

Every cut comes from one tree, so the partitions are nested and refine with depth. A cut into c
clusters replays the tree's first N − c merges (exactly c clusters even where merge heights
tie, where `fcluster(maxclust)` may return fewer). Ties in φ go to the smaller c.

The paper's ablations are two more ways to cut (`independent_cuts`: a tree per layer on its own
D⁽ˡ⁾, the same window rule, partitions not nested; `fixed_cuts`: k clusters of the global tree at
every layer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch

__all__ = ["Distance", "Linkage", "Cuts", "layer_distances", "build_tree", "tree_partition", "window_cuts",
           "tree_cuts", "independent_cuts", "fixed_cuts"]

Distance = Literal["frobenius", "cosine"]
Linkage = Literal["average", "single", "complete", "ward"]


@dataclass
class Cuts:
    """A cut per layer of the clients the tree was built on (rows in their order)."""
    counts: np.ndarray
    """`[L]` int64 clusters at each layer."""
    labels: np.ndarray
    """`[L, n]` int64 cluster of each client at each layer, numbered by first appearance."""
    scores: np.ndarray
    """`[L]` float64 φ of the chosen cut (τ for one cluster; NaN for a fixed k)."""


def layer_distances(factors: torch.Tensor, metric: Distance = "frobenius") -> np.ndarray:
    """`[n, n]` float64 distances between the rows of `factors` `[n, p]` (flattened B's of one
    layer), through one Gram matrix: ‖x_i − x_j‖² = ‖x_i‖² + ‖x_j‖² − 2⟨x_i, x_j⟩ (algorithms.md
    §6.10)."""
    x = factors.detach().to("cpu", torch.float64).flatten(1)
    gram = x @ x.T
    sq = gram.diagonal()
    if metric == "frobenius":
        d = (sq[:, None] + sq[None, :] - 2 * gram).clamp(min=0).sqrt()
    elif metric == "cosine":
        norms = sq.sqrt()
        d = 1 - gram / (norms[:, None] * norms[None, :]).clamp(min=1e-300)  # a zero row: cosine 0, distance 1
    else:
        raise ValueError(f"distance must be 'frobenius' or 'cosine', got {metric!r}")
    d = 0.5 * (d + d.T)
    d.fill_diagonal_(0)
    return d.numpy()


def build_tree(distances: np.ndarray, method: Linkage = "average") -> np.ndarray:
    """scipy's linkage matrix `[n − 1, 4]` of the agglomerative tree on a distance matrix."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    return linkage(squareform(distances, checks=False), method=method)


def tree_partition(tree: np.ndarray, n: int, c: int) -> np.ndarray:
    """`[n]` labels of the tree's cut into exactly `c` clusters (its first n − c merges replayed),
    numbered by first appearance."""
    if not 1 <= c <= n:
        raise ValueError(f"a tree over {n} clients has no cut into {c} clusters")
    parent = list(range(2 * n - 1))  # union-find over leaves and merge nodes

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for step in range(n - c):
        a, b = int(tree[step, 0]), int(tree[step, 1])
        parent[root(a)] = parent[root(b)] = n + step
    roots = [root(i) for i in range(n)]
    first = {}
    return np.array([first.setdefault(r, len(first)) for r in roots], dtype=np.int64)


def _silhouette(distances: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import silhouette_score

    return float(silhouette_score(distances, labels, metric="precomputed"))


def window_cuts(layers: list[np.ndarray], partition: Callable[[int, int], np.ndarray], *, window: int,
                tau: float) -> Cuts:
    """The monotone-window rule over layers `[n, n]` (shallow to deep); `partition(l, c)` gives
    layer l's c-cluster labels."""
    n = layers[0].shape[0]
    counts, labels, scores, previous = [], [], [], 1
    for index, distances in enumerate(layers):
        best, best_score = previous, -np.inf
        for c in range(previous, min(n, previous + window)):  # empty only when n == 1: keep c
            score = tau if c == 1 else _silhouette(distances, partition(index, c))
            if score > best_score:
                best, best_score = c, score
        counts.append(best)
        labels.append(partition(index, best) if best > 1 else np.zeros(n, dtype=np.int64))
        scores.append(best_score if np.isfinite(best_score) else tau)
        previous = best
    return Cuts(np.array(counts, dtype=np.int64), np.stack(labels), np.array(scores, dtype=np.float64))


def tree_cuts(layers: list[np.ndarray], *, method: Linkage = "average", window: int = 3,
              tau: float = 0.1) -> tuple[np.ndarray, Cuts]:
    """FedTreeLoRA's rule: one tree on the mean distance, a nested cut per layer. Returns the
    tree (scipy linkage) and the cuts."""
    tree = build_tree(sum(layers) / len(layers), method)
    n = layers[0].shape[0]
    return tree, window_cuts(layers, lambda _, c: tree_partition(tree, n, c), window=window, tau=tau)


def independent_cuts(layers: list[np.ndarray], *, method: Linkage = "average", window: int = 3,
                     tau: float = 0.1) -> Cuts:
    """Ablation: each layer's own tree on its own distances, the same window rule."""
    n = layers[0].shape[0]
    trees = [build_tree(d, method) for d in layers]
    return window_cuts(layers, lambda l, c: tree_partition(trees[l], n, c), window=window, tau=tau)


def fixed_cuts(tree: np.ndarray, n: int, num_layers: int, k: int) -> Cuts:
    """Ablation: the global tree cut into min(k, n) clusters at every layer."""
    c = min(k, n)
    labels = tree_partition(tree, n, c) if n > 1 else np.zeros(n, dtype=np.int64)
    return Cuts(np.full(num_layers, c, dtype=np.int64), np.tile(labels, (num_layers, 1)),
                np.full(num_layers, np.nan))

"""LSAC's client statistics, cosine distance and affinity graph against float64 dense references."""
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from fedhpc.strategies.subspace_clustering import (Statistic, client_statistic, cluster_clients, cosine_distance,
                                                   gaussian_affinity)

R, P, D = 3, 11, 9  # tier rank, d_out, d_in


def _dense_unit(B, A):
    M = (B @ A).numpy()
    return M / np.linalg.norm(M, axis=(1, 2), keepdims=True)


def _truncate(M, k):
    U, S, Vt = np.linalg.svd(M)
    return (U[..., :k] * S[..., None, :k]) @ Vt[..., :k, :]


def test_update_product_statistic_is_the_ema_of_unit_product_changes_truncated_to_rank_2r():
    g = torch.Generator().manual_seed(0)
    clients, lam = 4, 0.8
    stat = Statistic(torch.zeros(clients, P, 2 * R, dtype=torch.float64), torch.zeros(clients, 2 * R, D, dtype=torch.float64))
    ema = np.zeros((clients, P, D))
    for step in range(3):
        root_B, root_A = torch.randn(1, P, R, generator=g, dtype=torch.float64), torch.randn(1, R, D, generator=g, dtype=torch.float64)
        B, A = torch.randn(clients, P, R, generator=g, dtype=torch.float64), torch.randn(clients, R, D, generator=g, dtype=torch.float64)
        stat = client_statistic("update_product", stat, lam, B, A, root_B, root_A)
        change = (B @ A - root_B @ root_A).numpy()
        ema = _truncate(lam * ema + (1 - lam) * change / np.linalg.norm(change, axis=(1, 2), keepdims=True), 2 * R)
        np.testing.assert_allclose((stat.B @ stat.A).numpy(), ema, atol=1e-10)
        if step == 0:  # one change has rank <= 2r: nothing is truncated yet
            np.testing.assert_allclose(ema, (1 - lam) * change / np.linalg.norm(change, axis=(1, 2), keepdims=True),
                                       atol=1e-12)


@pytest.mark.parametrize("source", ["trained_B", "update_B"])
def test_b_statistics_are_the_ema_of_unit_b(source):
    g = torch.Generator().manual_seed(1)
    B, root_B = torch.randn(3, P, R, generator=g), torch.randn(1, P, R, generator=g)
    before = torch.randn(3, P, R, generator=g)
    stat = client_statistic(source, Statistic(before), 0.9, B, torch.randn(3, R, D), root_B, torch.randn(1, R, D))
    x = B - root_B if source == "update_B" else B
    ref = 0.9 * before + 0.1 * x / x.flatten(1).norm(dim=1).view(-1, 1, 1)
    torch.testing.assert_close(stat.B, ref)
    assert stat.A is None


def test_cosine_distance_of_products_matches_dense_cosines():
    g = torch.Generator().manual_seed(2)
    per_matrix = [Statistic(torch.randn(5, p, 2 * R, generator=g, dtype=torch.float64),
                            torch.randn(5, 2 * R, d, generator=g, dtype=torch.float64)) for p, d in ((P, D), (7, 13))]
    flats = [(s.B @ s.A).flatten(1).numpy() for s in per_matrix]
    ref = 1 - np.mean([(f @ f.T) / np.outer(np.linalg.norm(f, axis=1), np.linalg.norm(f, axis=1)) for f in flats], 0)
    np.fill_diagonal(ref, 0)
    np.testing.assert_allclose(cosine_distance(per_matrix), ref, atol=1e-12)
    Bs = [Statistic(torch.randn(5, P, R, generator=g, dtype=torch.float64))]
    f = Bs[0].B.flatten(1).numpy()
    ref = 1 - (f @ f.T) / np.outer(np.linalg.norm(f, axis=1), np.linalg.norm(f, axis=1))
    np.fill_diagonal(ref, 0)
    np.testing.assert_allclose(cosine_distance(Bs), ref, atol=1e-12)


def test_affinity_sigma_scale_and_nearest_neighbour_graph():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, 2))
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    off = d[~np.eye(9, dtype=bool)]
    np.testing.assert_allclose(gaussian_affinity(d, sigma_scale=0.5), np.exp(-d ** 2 / (2 * (0.5 * np.median(off)) ** 2)))
    S = gaussian_affinity(d, sigma=1.0, neighbors=2)
    for i in range(9):
        for j in range(9):
            near_i = j in np.argsort(d[i] + np.where(np.arange(9) == i, np.inf, 0))[:2]
            near_j = i in np.argsort(d[j] + np.where(np.arange(9) == j, np.inf, 0))[:2]
            kept = i == j or near_i or near_j
            assert S[i, j] == (pytest.approx(np.exp(-d[i, j] ** 2 / 2)) if kept else 0.0)


def test_cosine_separates_clusters_that_pull_one_subspace_in_opposite_directions():
    """Four clusters of product changes: +X_1, -X_1, +X_2, -X_2 (+ noise). Principal angles see
    two subspaces; the signed cosine sees four clusters, and the eigengap counts them once the
    kernel is sharper than the median (at the median it merges two)."""
    rng = np.random.default_rng(4)
    truth = rng.permutation(np.arange(20) % 4)
    per_matrix = []
    for p, d in ((P, D), (12, 10)):
        X = [rng.standard_normal((p, R)) @ rng.standard_normal((R, d)) for _ in range(2)]
        centres = [X[0], -X[0], X[1], -X[1]]
        M = np.stack([centres[c] + 0.3 * rng.standard_normal((p, d)) for c in truth])
        U, S, Vt = np.linalg.svd(M)
        per_matrix.append(Statistic(torch.tensor(U[..., :2 * R] * S[:, None, :2 * R]), torch.tensor(Vt[:, :2 * R])))
    found = cluster_clients(per_matrix, k_min=2, k_max=8, similarity="cosine", sigma_scale=0.5)
    assert found.count == 4 and adjusted_rand_score(truth, found.labels) == 1.0
    assert cluster_clients(per_matrix, k_min=2, k_max=8, similarity="cosine").count == 3
    assert cluster_clients(per_matrix, k_min=2, k_max=8, similarity="subspace", sigma_scale=0.5).count == 2

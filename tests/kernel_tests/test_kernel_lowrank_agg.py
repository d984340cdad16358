"""lowrank_aggregate against a float64 dense SVD of Σ w_k B_k A_k (numpy), exact and randomized."""
import functools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedhpc.kernels import lowrank_aggregate
from fedhpc.kernels.lowrank_agg.reference import prefer_randomized
from .kernel_testing import PROPERTY, assert_rel_close, needs_interpreter, orthonormality_error


def lora_clients(K, d_out, d_in, r, rank, *, seed, noise=0.3):
    """Clients that share a rank-`rank` update (decaying scales) plus client-specific noise."""
    rng = np.random.default_rng(seed)
    shared_B = rng.standard_normal((d_out, rank))
    shared_A = np.linspace(3, 1, rank)[:, None] * rng.standard_normal((rank, d_in))
    B = noise * rng.standard_normal((K, d_out, r))
    A = noise * rng.standard_normal((K, r, d_in))
    k = min(r, rank)
    B[:, :, :k] += shared_B[:, :k]
    A[:, :k] += shared_A[:k]
    w = rng.uniform(0.5, 1.5, K)
    return torch.from_numpy(B), torch.from_numpy(A), torch.from_numpy(w / w.sum())


def dense_svd(B, A, w, rank):
    """numpy float64 SVD of the summed product: the oracle."""
    M = sum(float(wk) * Bk.numpy() @ Ak.numpy() for Bk, Ak, wk in zip(B, A, w))
    U, S, Vh = np.linalg.svd(M)
    return U[:, :rank], S[:rank], Vh[:rank]


def projector_gap(X, Y) -> float:
    """‖XXᵀ − YYᵀ‖₂ = sine of the largest principal angle between two orthonormal bases."""
    X, Y = np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    return float(np.linalg.norm(X @ X.T - Y @ Y.T, 2))


def check_against_dense(out, ref, tol, subspace_tol=None):
    """Singular values within tol (relative), U and V subspaces within subspace_tol (default 100·tol)."""
    (U, S, Vh), (U0, S0, Vh0) = out, ref
    subspace_tol = tol * 100 if subspace_tol is None else subspace_tol
    assert_rel_close("S", torch.from_numpy(S0), S, tol)
    assert projector_gap(U, U0) <= subspace_tol, f"U subspace: {projector_gap(U, U0):.2e}"
    assert projector_gap(Vh.mT, Vh0.T) <= subspace_tol, f"V subspace: {projector_gap(Vh.mT, Vh0.T):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("K,d_out,d_in,r,rank", [
    pytest.param(5, 63, 40, 4, 3, id="K5-dout63-din40-r4-k3"),
    pytest.param(3, 50, 70, 8, 8, id="K3-dout50-din70-r8-k8"),
])
def test_exact_matches_dense_svd(K, d_out, d_in, r, rank, dtype):
    B, A, w = lora_clients(K, d_out, d_in, r, rank, seed=K)
    U, S, Vh = lowrank_aggregate(B.to(dtype), A.to(dtype), w.to(dtype), rank=rank, method="exact")
    assert (U.shape, S.shape, Vh.shape) == ((d_out, rank), (rank,), (rank, d_in)) and U.dtype == dtype
    check_against_dense((U, S, Vh), dense_svd(B, A, w, rank), 1e-5 if dtype == torch.float32 else 1e-11)


def test_heterogeneous_ranks_lists_and_masks_agree():
    B, A, w = lora_clients(4, 40, 30, 8, 4, seed=1)
    ranks = torch.tensor([2, 8, 5, 3])
    lists = ([B[k, :, :ranks[k]] for k in range(4)], [A[k, :ranks[k]] for k in range(4)])
    ref = dense_svd(*lists, w, 4)
    B_junk = B.clone()
    for k in range(4):
        B_junk[k, :, ranks[k]:] = 1e3  # padded columns must be ignored, whatever they hold
    check_against_dense(lowrank_aggregate(B_junk, A, w, rank=4, ranks=ranks), ref, 1e-11)
    check_against_dense(lowrank_aggregate(*lists, w, rank=4), ref, 1e-11)


def test_layers_batch_like_a_loop():
    layers = [lora_clients(3, 30, 20, 4, 2, seed=s) for s in range(3)]
    B, A = torch.stack([l[0] for l in layers]), torch.stack([l[1] for l in layers])
    w = layers[0][2]
    U, S, Vh = lowrank_aggregate(B, A, w, rank=2)
    assert U.shape == (3, 30, 2) and S.shape == (3, 2) and Vh.shape == (3, 2, 20)
    for i in range(3):
        check_against_dense((U[i], S[i], Vh[i]), dense_svd(B[i], A[i], w, 2), 1e-11)


@functools.cache
def randomized_case():
    """R = Σ r_k = 512 > min(d) = 192, σ_17/σ_16 ≈ 0.29: auto goes randomized."""
    B, A, w = lora_clients(32, 256, 192, 16, 16, seed=7, noise=1.5)
    return B.float(), A.float(), w.float(), dense_svd(B, A, w, 16)


def test_randomized_defaults_match_exact_top_subspace():
    B, A, w, ref = randomized_case()
    assert prefer_randomized(512, 256, 192, 32, 4)
    auto = lowrank_aggregate(B, A, w, rank=16)
    rand = lowrank_aggregate(B, A, w, rank=16, method="randomized")
    assert all(torch.equal(x, y) for x, y in zip(auto, rand)), "auto should have chosen randomized"
    exact = lowrank_aggregate(B, A, w, rank=16, method="exact")
    check_against_dense(exact, ref, 1e-6, subspace_tol=1e-5)
    check_against_dense(rand, ref, 1e-6, subspace_tol=1e-5)


@pytest.mark.parametrize("oversample,power_iters", [(0, 1), (16, 2), (0, 4)])
def test_weaker_randomized_settings_miss_the_subspace(oversample, power_iters):
    """The check above has teeth: fewer power iterations or no oversampling fail it."""
    B, A, w, ref = randomized_case()
    out = lowrank_aggregate(B, A, w, rank=16, method="randomized", oversample=oversample, power_iters=power_iters)
    with pytest.raises(AssertionError, match="subspace|relative error"):
        check_against_dense(out, ref, 1e-6, subspace_tol=1e-5)


@PROPERTY
@given(ranks=st.lists(st.integers(0, 5), min_size=1, max_size=5), d_out=st.integers(1, 30),
       d_in=st.integers(1, 30), rank=st.integers(1, 30), method=st.sampled_from(["exact", "randomized"]),
       seed=st.integers(0, 2**16))
def test_property_best_rank_k_approximation(ranks, d_out, d_in, rank, method, seed):
    """Whatever the shapes and spectrum: orthonormal factors, exact singular values, and the
    Eckart-Young residual ‖M − U S Vh‖_F² = Σ_{i>k} σ_i² (randomized: when the sketch covers R)."""
    rank = min(rank, d_out, d_in)
    gen = torch.Generator().manual_seed(seed)
    B = [torch.randn(d_out, rk, generator=gen, dtype=torch.float64) for rk in ranks]
    A = [torch.randn(rk, d_in, generator=gen, dtype=torch.float64) for rk in ranks]
    w = torch.rand(len(ranks), generator=gen, dtype=torch.float64)
    M = sum(wk * Bk @ Ak for Bk, Ak, wk in zip(B, A, w)).numpy()
    sigma = np.linalg.svd(M, compute_uv=False)
    U, S, Vh = lowrank_aggregate(B, A, w, rank=rank, method=method, oversample=sum(ranks))
    assert orthonormality_error(U) <= 1e-12 and orthonormality_error(Vh.mT) <= 1e-12
    scale = max(sigma[0], 1e-300)
    assert np.abs(S.numpy() - np.pad(sigma, (0, rank))[:rank]).max() <= 1e-11 * scale
    residual = np.linalg.norm(M - ((U * S) @ Vh).numpy()) ** 2
    assert abs(residual - (sigma[rank:] ** 2).sum()) <= 1e-10 * scale ** 2


def test_auto_rule_prefers_exact_for_few_clients():
    assert not prefer_randomized(64, 4096, 4096, 32, 2)       # 4 clients x r=16
    assert prefer_randomized(1024, 4096, 4096, 32, 2)         # 64 clients x r=16
    assert not prefer_randomized(24, 4096, 4096, 32, 2)       # sketch >= R: exact is as cheap


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_rank_above_total_rank_pads_with_zeros(method):
    B, A, w = lora_clients(2, 30, 25, 2, 2, seed=3)
    U, S, Vh = lowrank_aggregate(B, A, w, rank=6, method=method)
    assert U.shape == (30, 6) and Vh.shape == (6, 25)
    assert (S[4:].abs() <= 1e-12 * S[0]).all()
    assert orthonormality_error(U) <= 1e-12 and orthonormality_error(Vh.mT) <= 1e-12
    check_against_dense((U[:, :4], S[:4], Vh[:4]), dense_svd(B, A, w, 4), 1e-11)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_zero_update_gives_zero_not_nan(method):
    B, A, w = torch.zeros(4, 20, 3), torch.randn(4, 3, 15), torch.ones(4)  # LoRA init: B = 0
    U, S, Vh = lowrank_aggregate(B, A, w, rank=2, method=method)
    assert (S == 0).all() and not U.isnan().any() and not Vh.isnan().any()


@pytest.mark.parametrize("kwargs,match", [
    (dict(B=torch.randn(3, 5, 2), A=torch.randn(3, 3, 4)), "must agree"),
    (dict(B=torch.randn(5, 2), A=torch.randn(2, 4)), r"\[K, d_out, r\]"),
    (dict(w=torch.ones(2)), r"weights must be a tensor \[K=3\]"),
    (dict(rank=0), r"rank must be an int in \[1, min\(d_out=5, d_in=4\)\]"),
    (dict(rank=5), "got 5"),
    (dict(method="svd"), "method must be"),
    (dict(ranks=torch.tensor([1, 2, 3])), r"ranks must lie in \[0, 2\]"),
    (dict(B=[torch.randn(5, 2)], A=[torch.randn(3, 4)], w=torch.ones(1)), "client 0"),
    (dict(B=[torch.randn(5, 2)], A=torch.randn(1, 2, 4), w=torch.ones(1)), "both be tensors or both"),
])
def test_validation(kwargs, match):
    args = dict(B=torch.randn(3, 5, 2), A=torch.randn(3, 2, 4), w=torch.ones(3), rank=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        lowrank_aggregate(args.pop("B"), args.pop("A"), args.pop("w"), **args)


@needs_interpreter
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_triton_orthonormalisation_matches_torch(method):
    B, A, w = lora_clients(4, 63, 40, 4, 3, seed=9)
    B, A, w = B.float(), A.float(), w.float()
    tri = lowrank_aggregate(B, A, w, rank=3, method=method, backend="triton")
    ref = lowrank_aggregate(B, A, w, rank=3, method=method, backend="torch")
    check_against_dense(tri, [t.double().numpy() for t in ref], 1e-5)

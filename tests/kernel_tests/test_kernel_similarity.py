"""subspace_similarity against scipy's principal angles, properties, and Triton vs torch."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.linalg import subspace_angles

from fedhpc.kernels import subspace_similarity
from fedhpc.kernels.similarity import reference
from .kernel_testing import PROPERTY, assert_rel_close, needs_interpreter, random_bases


def scipy_similarity(U: np.ndarray, V: np.ndarray, ranks_u, ranks_v) -> np.ndarray:
    """Mean cos² of the principal angles between span(U_i[:, :r_i]) and span(V_j[:, :r_j])."""
    S = np.zeros((len(U), len(V)))
    for i, (Ui, ri) in enumerate(zip(U, ranks_u)):
        for j, (Vj, rj) in enumerate(zip(V, ranks_v)):
            if min(ri, rj) > 0:
                S[i, j] = np.mean(np.cos(subspace_angles(Ui[:, :ri], Vj[:, :rj])) ** 2)
    return S


def overlapping_bases(n: int, d: int, r: int, seed: int) -> torch.Tensor:
    """Noisy copies of one common subspace (same for every seed), so S spreads over [0, 1]."""
    common = np.linalg.qr(np.random.default_rng(0).standard_normal((d, r)))[0]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        signal = common @ rng.standard_normal((r, r)) * rng.uniform(0, 2) * np.sqrt(d)
        out.append(np.linalg.qr(signal + rng.standard_normal((d, r)))[0])
    return torch.from_numpy(np.stack(out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("n,m,d,r", [pytest.param(*c, id="n{}-m{}-d{}-r{}".format(*c))
                                     for c in [(5, 4, 63, 4), (6, 7, 100, 16), (3, 2, 40, 33)]])
def test_matches_scipy_angles(n, m, d, r, dtype):
    U, V = overlapping_bases(n, d, r, seed=1), overlapping_bases(m, d, r, seed=2)
    S = subspace_similarity(U.to(dtype), V.to(dtype))
    assert S.dtype == dtype and S.shape == (n, m)
    ref = scipy_similarity(U.numpy(), V.numpy(), [r] * n, [r] * m)
    assert ref.std() > 0.01, "test data should spread S"
    assert_rel_close("S", torch.from_numpy(ref), S, 1e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("symmetric", [True, False], ids=["UU", "UV"])
def test_heterogeneous_ranks_match_scipy(symmetric):
    U = overlapping_bases(6, 50, 8, seed=3)
    V = U if symmetric else overlapping_bases(5, 50, 8, seed=4)
    ranks_u = torch.tensor([8, 3, 0, 5, 1, 8])
    ranks_v = ranks_u if symmetric else torch.tensor([2, 8, 7, 0, 4])
    S = subspace_similarity(U, None if symmetric else V, ranks_u=ranks_u,
                            ranks_v=None if symmetric else ranks_v)
    ref = scipy_similarity(U.numpy(), V.numpy(), ranks_u.tolist(), ranks_v.tolist())
    assert_rel_close("S", torch.from_numpy(ref), S, 1e-12)


def test_symmetric_equals_explicit_and_diagonal_is_one():
    U = random_bases(9, 30, 5, seed=5)
    S = subspace_similarity(U)
    assert_rel_close("S", subspace_similarity(U, U), S, 1e-14)
    assert torch.equal(S, S.mT)
    assert_rel_close("diag", torch.ones(9, dtype=torch.float64), S.diagonal(), 1e-14)


def test_slabs_cover_every_pair(monkeypatch):
    """A tiny slab budget forces one basis per GEMM: blocking must not change S."""
    U, V = random_bases(7, 20, 3, seed=6), random_bases(4, 20, 3, seed=7)
    full_uv, full_uu = subspace_similarity(U, V), subspace_similarity(U)
    monkeypatch.setattr(reference, "SLAB_BYTES", 1)
    assert_rel_close("S_uv", full_uv, subspace_similarity(U, V), 1e-14)
    assert_rel_close("S_uu", full_uu, subspace_similarity(U), 1e-14)


@PROPERTY
@given(n=st.integers(1, 6), m=st.integers(1, 6), r=st.integers(1, 6), extra=st.integers(0, 20),
       seed=st.integers(0, 2**16))
def test_property_rotation_invariance_and_range(n, m, r, extra, seed):
    d = r + extra
    U, V = random_bases(n, d, r, seed=seed), random_bases(m, d, r, seed=seed + 1)
    rot = random_bases(n, r, r, seed=seed + 2)  # U_i -> U_i O_i spans the same subspace
    S = subspace_similarity(U, V)
    assert_rel_close("S(UO, V)", S, subspace_similarity(U @ rot, V), 1e-12)
    assert (S >= -1e-12).all() and (S <= 1 + 1e-12).all()
    assert_rel_close("S(V, U)ᵀ", S, subspace_similarity(V, U).mT, 1e-12)


@pytest.mark.parametrize("kwargs,match", [
    (dict(U=torch.randn(3, 4)), r"\[n, d, r\]"),
    (dict(U=torch.randn(3, 8, 2), V=torch.randn(2, 9, 2)), "d=8"),
    (dict(U=torch.randn(3, 8, 2), ranks_u=torch.tensor([1, 2])), r"ranks_u must be an integer tensor \[3\]"),
    (dict(U=torch.randn(3, 8, 2), ranks_u=torch.tensor([1, 3, 0])), r"\[0, 2\], got values in \[0, 3\]"),
    (dict(U=torch.randn(3, 8, 2), ranks_v=torch.tensor([1, 1, 1])), "ranks_v needs V"),
    (dict(U=torch.ones(3, 8, 2, dtype=torch.int32)), "floating point"),
])
def test_validation(kwargs, match):
    U = kwargs.pop("U")
    with pytest.raises(ValueError, match=match):
        subspace_similarity(U, **kwargs)


@needs_interpreter
@pytest.mark.parametrize("n,m,d,r,ranked", [
    pytest.param(5, None, 63, 4, False, id="n5-d63-r4-fp32"),
    pytest.param(7, 3, 63, 16, False, id="n7-m3-d63-r16-fp32"),
    pytest.param(20, None, 100, 8, True, id="n20-d100-r8-fp32-ranks"),
    pytest.param(9, 4, 40, 33, True, id="n9-m4-d40-r33-fp32-ranks"),
])
def test_triton_matches_reference(n, m, d, r, ranked):
    U = overlapping_bases(n, d, r, seed=n).float()
    V = None if m is None else overlapping_bases(m, d, r, seed=m).float()
    gen = torch.Generator().manual_seed(0)
    ranks_u = torch.randint(0, r + 1, (n,), generator=gen) if ranked else None
    ranks_v = torch.randint(0, r + 1, (m,), generator=gen) if ranked and m else None
    S_tri = subspace_similarity(U, V, ranks_u=ranks_u, ranks_v=ranks_v, backend="triton")
    S_ref = subspace_similarity(U.double(), None if V is None else V.double(),
                                ranks_u=ranks_u, ranks_v=ranks_v, backend="torch")
    assert_rel_close("S", S_ref, S_tri, 2e-6)

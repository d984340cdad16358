"""orthonormalize: CholeskyQR2 + fallback against numpy's Householder QR, stress cases, Triton vs torch."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedhpc.kernels import orthonormalize
from fedhpc.kernels.cholqr import reference
from .kernel_testing import PROPERTY, assert_rel_close, needs_interpreter, orthonormality_error

TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def conditioned(b: int, d: int, r: int, kappa: float, seed: int) -> np.ndarray:
    """[b, d, r] float64 matrices with singular values spread log-uniformly over [1/κ, 1]."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(b):
        U = np.linalg.qr(rng.standard_normal((d, r)))[0]
        V = np.linalg.qr(rng.standard_normal((r, r)))[0]
        out.append(U @ np.diag(np.logspace(0, -np.log10(kappa), r)) @ V.T)
    return np.stack(out)


def check_factorisation(X: torch.Tensor, Q: torch.Tensor, R: torch.Tensor, tol: float) -> None:
    """The contract: orthonormal Q, upper-triangular R with diag >= 0, X = QR, no NaN."""
    assert not Q.isnan().any() and not R.isnan().any()
    assert orthonormality_error(Q) <= tol * 10, f"QᵀQ − I: {orthonormality_error(Q):.2e}"
    assert torch.equal(R, R.triu()), "R is not upper triangular"
    assert (R.diagonal(dim1=-2, dim2=-1) >= 0).all(), "diag(R) has negative entries"
    assert_rel_close("QR", X.double(), Q.double() @ R.double(), tol)


def spy_fallback(monkeypatch) -> list:
    """Record the batch sizes handed to the Householder fallback."""
    calls = []
    original = reference.householder

    def spy(X):
        calls.append(X.shape[0])
        return original(X)

    monkeypatch.setattr(reference, "householder", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("b,d,r", [pytest.param(b, d, r, id=f"b{b}-d{d}-r{r}")
                                   for b, d, r in [(4, 63, 5), (3, 128, 16), (2, 500, 64), (2, 7, 7)]])
def test_matches_numpy_qr(b, d, r, dtype):
    X64 = conditioned(b, d, r, 10.0, seed=d + r)
    X = torch.from_numpy(X64).to(dtype)
    Q, R = orthonormalize(X)
    assert Q.dtype == R.dtype == dtype and Q.shape == (b, d, r) and R.shape == (b, r, r)
    check_factorisation(X, Q, R, TOL[dtype])
    for i in range(b):  # unique factorisation once diag(R) > 0: compare to numpy with signs fixed
        Qn, Rn = np.linalg.qr(X64[i])
        sign = np.sign(np.diag(Rn))
        assert_rel_close(f"Q[{i}]", Qn * sign, Q[i], TOL[dtype] * 10)
        assert_rel_close(f"R[{i}]", Rn * sign[:, None], R[i], TOL[dtype] * 10)


@pytest.mark.parametrize("kappa,falls_back", [(1e1, False), (1e2, False), (1e5, True), (1e7, True)],
                         ids=["k1e1", "k1e2", "k1e5", "k1e7"])
def test_ill_conditioned_fp32_falls_back(kappa, falls_back, monkeypatch):
    calls = spy_fallback(monkeypatch)
    X = torch.from_numpy(conditioned(3, 256, 16, kappa, seed=1)).float()
    Q, R = orthonormalize(X)
    check_factorisation(X, Q, R, TOL[torch.float32])
    assert bool(calls) == falls_back, f"κ={kappa:.0e}: fallback calls {calls}"


def test_ill_conditioned_fp64_stays_cholesky(monkeypatch):
    calls = spy_fallback(monkeypatch)
    X = torch.from_numpy(conditioned(2, 200, 12, 1e5, seed=2))
    check_factorisation(X, *orthonormalize(X), TOL[torch.float64])
    assert calls == []


def test_only_bad_matrices_fall_back(monkeypatch):
    calls = spy_fallback(monkeypatch)
    X = torch.from_numpy(conditioned(5, 100, 8, 10.0, seed=3)).float()
    X[2, :, 3] = 0
    Q, R = orthonormalize(X)
    check_factorisation(X, Q, R, TOL[torch.float32])
    assert calls == [1]


def test_cpu_blocks_match_one_block_and_fall_back_alone(monkeypatch):
    """Cache blocking (2 matrices per block, a short last block) gives the one-block result;
    a bad matrix in the middle block still falls back alone."""
    X = torch.from_numpy(conditioned(5, 100, 8, 10.0, seed=7)).float()
    X[3, :, 2] = 0
    whole = orthonormalize(X)
    monkeypatch.setattr(reference, "BLOCK_BYTES", 2 * 100 * 8 * 4)
    calls = spy_fallback(monkeypatch)
    Q, R = orthonormalize(X)
    assert calls == [1]
    assert_rel_close("Q", whole[0], Q, 1e-6)
    assert_rel_close("R", whole[1], R, 1e-6)
    check_factorisation(X, Q, R, TOL[torch.float32])


@pytest.mark.parametrize("case", ["zero", "zero-column", "duplicate-columns", "rank-1", "tiny-scale"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_rank_deficient_never_nan(case, dtype):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(2, 40, 6, generator=gen, dtype=dtype)
    if case == "zero":
        X.zero_()
    elif case == "zero-column":
        X[:, :, 2] = 0
    elif case == "duplicate-columns":
        X[:, :, 4] = X[:, :, 1]
    elif case == "rank-1":
        X = X[:, :, :1] * torch.randn(2, 1, 6, generator=gen, dtype=dtype)
    else:
        X = X * 1e-30
    Q, R = orthonormalize(X)
    check_factorisation(X, Q, R, TOL[dtype])
    if case == "zero":
        assert (R == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_inputs_are_upcast(dtype):
    X = torch.randn(3, 50, 4).to(dtype)
    Q, R = orthonormalize(X)
    assert Q.dtype == torch.float32
    check_factorisation(X.float(), Q, R, TOL[torch.float32])


def test_leading_dims_and_single_matrix():
    X = torch.randn(2, 3, 30, 4, dtype=torch.float64)
    Q, R = orthonormalize(X)
    assert Q.shape == X.shape and R.shape == (2, 3, 4, 4)
    Q1, R1 = orthonormalize(X[1, 2])
    assert_rel_close("Q", Q[1, 2], Q1, 1e-14)
    assert orthonormalize(torch.empty(0, 5, 3))[0].shape == (0, 5, 3)


@pytest.mark.parametrize("X,match", [
    (torch.randn(2, 3, 5), "d >= r"),
    (torch.randn(5), r"\[..., d, r\]"),
    (torch.ones(2, 5, 3, dtype=torch.int64), "floating point"),
    ([[1.0]], r"\[..., d, r\]"),
])
def test_validation(X, match):
    with pytest.raises(ValueError, match=match):
        orthonormalize(X)


@PROPERTY
@given(b=st.integers(1, 4), r=st.integers(1, 12), extra=st.integers(0, 60),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_property_factorisation(b, r, extra, dtype, seed):
    X = torch.randn(b, r + extra, r, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    check_factorisation(X, *orthonormalize(X), TOL[dtype])


@needs_interpreter
@pytest.mark.parametrize("b,d,r,dtype", [
    pytest.param(3, 63, 4, torch.float32, id="b3-d63-r4-fp32"),
    pytest.param(2, 100, 16, torch.float32, id="b2-d100-r16-fp32"),
    pytest.param(2, 70, 33, torch.float32, id="b2-d70-r33-fp32"),
    pytest.param(2, 65, 8, torch.bfloat16, id="b2-d65-r8-bf16"),
])
def test_triton_matches_reference(b, d, r, dtype):
    X = torch.from_numpy(conditioned(b, d, r, 30.0, seed=r)).to(dtype)
    Qt, Rt = orthonormalize(X, backend="triton")
    Qr, Rr = orthonormalize(X, backend="torch")
    assert_rel_close("Q", Qr, Qt, 1e-5)
    assert_rel_close("R", Rr, Rt, 1e-5)
    check_factorisation(X.float(), Qt, Rt, TOL[torch.float32])


@needs_interpreter
def test_triton_falls_back_per_matrix(monkeypatch):
    calls = spy_fallback(monkeypatch)
    X = torch.from_numpy(conditioned(3, 64, 8, 10.0, seed=5)).float()
    X[0] = 0
    X[2] = torch.from_numpy(conditioned(1, 64, 8, 1e7, seed=6)[0]).float()
    Q, R = orthonormalize(X, backend="triton")
    check_factorisation(X, Q, R, TOL[torch.float32])
    assert calls == [2]

"""The Python side of the CUDA backend, run on CPU against a stand-in for ``fedhpc._cuda``.

The stand-in implements the extension's documented contract (csrc/README.md) in torch,
so these tests check the glue — rank masking, width padding, rescaling, symmetric
calls, the fallback merge — not the CUDA kernels themselves (no GPU here).
"""
import numpy as np
import pytest
import torch

from fedhpc.kernels.cholqr import cuda as cholqr_cuda
from fedhpc.kernels.cholqr import reference as cholqr_ref
from fedhpc.kernels.similarity import cuda as similarity_cuda
from fedhpc.kernels.similarity.reference import similarity_reference
from .kernel_testing import assert_rel_close, orthonormality_error, random_bases


class FakeExtension:
    """fedhpc._cuda semantics: cholqr2 -> (Q, R, ok) with zeros where rejected; S = ‖UᵢᵀVⱼ‖²/r.

    Written from that contract with numpy, not from the torch reference's internals: Q R by
    numpy's Householder QR in float64 with diag(R) >= 0, rejected (ok False, zeros) where the
    matrix is not finite or its condition number exceeds what CholeskyQR2 handles in float32."""

    def __init__(self):
        self.symmetric_calls = 0

    def cholqr2(self, X, tolerance):
        assert X.dtype == torch.float32 and X.is_contiguous() and tolerance == cholqr_ref.TOLERANCE
        b, d, r = X.shape
        Q, R, ok = np.zeros((b, d, r)), np.zeros((b, r, r)), np.zeros(b, dtype=bool)
        for i, x in enumerate(X.double().numpy()):
            if not np.isfinite(x).all() or np.linalg.cond(x) > 1e3:
                continue
            q, rr = np.linalg.qr(x)
            sign = np.where(np.diag(rr) < 0, -1.0, 1.0)
            Q[i], R[i], ok[i] = q * sign, sign[:, None] * rr, True
        return torch.from_numpy(Q).float(), torch.from_numpy(R).float(), torch.from_numpy(ok)

    def subspace_similarity(self, U, V):
        assert U.dtype == V.dtype == torch.float32 and U.shape[1:] == V.shape[1:]
        self.symmetric_calls += U is V
        return torch.einsum("idr,jds->ijrs", U, V).square().sum((2, 3)) / U.shape[-1]


@pytest.fixture
def fake(monkeypatch):
    ext = FakeExtension()
    for module in (cholqr_cuda, similarity_cuda):
        monkeypatch.setattr(module, "cuda_extension", lambda: ext)
    return ext


def test_cholqr2_binding_merges_the_fallback(fake, monkeypatch):
    X = torch.randn(4, 60, 6)
    X[1] = 0
    X[3, :, 5] = X[3, :, 0]
    calls = []
    original = cholqr_ref.householder
    monkeypatch.setattr(cholqr_ref, "householder", lambda A: calls.append(A.shape[0]) or original(A))
    Q, R = cholqr_cuda.cholqr2_cuda(X)
    assert calls == [2]
    assert orthonormality_error(Q) < 1e-5
    assert_rel_close("QR", X, Q @ R, 1e-6)
    assert_rel_close("Q", cholqr_ref.cholqr2_reference(X)[0], Q, 1e-6)


@pytest.mark.parametrize("symmetric", [True, False], ids=["UU", "UV"])
def test_similarity_binding_applies_ranks_and_widths(fake, symmetric):
    U = random_bases(6, 40, 8, seed=1, dtype=torch.float32)
    V = U if symmetric else random_bases(5, 40, 5, seed=2, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    ranks_u = torch.randint(0, 9, (6,), generator=gen)
    ranks_v = ranks_u if symmetric else torch.randint(0, 6, (5,), generator=gen)
    V_arg = None if symmetric else V
    S = similarity_cuda.similarity_cuda(U, V_arg, ranks_u, ranks_v)
    assert_rel_close("S", similarity_reference(U.double(), None if symmetric else V.double(), ranks_u, ranks_v),
                     S, 1e-6)
    assert fake.symmetric_calls == int(symmetric), "V=None must reach the extension as the same tensor twice"
    assert np.isfinite(S.numpy()).all()

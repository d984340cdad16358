"""Shared helpers of the kernel tests: relative-error checks and the property-test budget."""
import importlib.util
import os

import numpy as np
import pytest
import torch
from hypothesis import settings

PROPERTY = settings(max_examples=12, deadline=None, derandomize=True)
"""Hypothesis budget per property (kept small: the suite must run in minutes on 2 cores)."""

needs_interpreter = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET", "1") != "1",
    reason="Triton on CPU tensors needs triton and TRITON_INTERPRET=1 (the kernel conftest sets it per test)")


def rel_err(ref, out) -> float:
    """‖out − ref‖_F / ‖ref‖_F in float64 (plain ‖out‖_F when ref is zero)."""
    ref = torch.as_tensor(np.asarray(ref) if not isinstance(ref, torch.Tensor) else ref).double()
    out = torch.as_tensor(np.asarray(out) if not isinstance(out, torch.Tensor) else out).double()
    scale = ref.norm()
    return float((out - ref).norm() / scale) if scale > 0 else float(out.norm())


def assert_rel_close(name: str, ref, out, tol: float) -> None:
    """Fail with the tensor's name and the error when out is not within tol of ref."""
    assert tuple(out.shape) == tuple(ref.shape), f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert np.isfinite(np.asarray(out, dtype=np.float64)).all(), f"{name}: non-finite values"
    err = rel_err(ref, out)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def orthonormality_error(Q: torch.Tensor) -> float:
    """max |QᵀQ − I| over a batch [..., d, r], in float64."""
    Q = Q.double()
    return float((Q.mT @ Q - torch.eye(Q.shape[-1], dtype=torch.float64)).abs().max())


def random_bases(n: int, d: int, r: int, *, seed: int, dtype=torch.float64) -> torch.Tensor:
    """n orthonormal bases [n, d, r] from QR of Gaussian matrices (numpy, independent of the code)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([np.linalg.qr(rng.standard_normal((d, r)))[0] for _ in range(n)])).to(dtype)

"""Backend selection: automatic choice, forcing by keyword or environment, and the error text."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedhpc.kernels import available_backends, orthonormalize, segment_sum, subspace_similarity
from fedhpc.kernels.cholqr import IMPLS as CHOLQR_IMPLS
from fedhpc.kernels.dispatch import cuda_extension, select
from .kernel_testing import needs_interpreter


def test_cpu_tensors_use_torch_automatically():
    X = torch.randn(2, 8, 3)
    assert select("orthonormalize", CHOLQR_IMPLS, X).__module__.endswith("cholqr.reference")
    assert available_backends("cpu")["torch"] is None


@needs_interpreter
def test_env_forces_triton(monkeypatch):
    X = torch.randn(2, 8, 3)
    monkeypatch.setenv("FEDHPC_KERNELS", "triton")
    assert select("orthonormalize", CHOLQR_IMPLS, X).__module__.endswith("cholqr.triton")
    assert select("orthonormalize", CHOLQR_IMPLS, X, backend="torch").__module__.endswith("reference")


def test_unknown_backend_is_a_value_error(monkeypatch):
    with pytest.raises(ValueError, match="'tpu' is not a backend"):
        orthonormalize(torch.randn(4, 2), backend="tpu")
    monkeypatch.setenv("FEDHPC_KERNELS", "gpu")
    with pytest.raises(ValueError, match="FEDHPC_KERNELS='gpu'"):
        orthonormalize(torch.randn(4, 2))


def test_forced_cuda_on_cpu_names_the_reason():
    with pytest.raises(RuntimeError, match=r"forced backend 'cuda' is unavailable \(cuda: tensors are on cpu"):
        subspace_similarity(torch.randn(2, 5, 2), backend="cuda")


def test_op_without_a_backend_says_so():
    with pytest.raises(RuntimeError, match="segment_sum has no cuda implementation"):
        segment_sum(torch.randn(2, 2), torch.zeros(2, dtype=torch.int64), torch.ones(2), 1, backend="cuda")


def test_forced_triton_without_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 together with a forced triton backend"):
        orthonormalize(torch.randn(2, 8, 3), backend="triton")


@needs_interpreter
def test_forced_triton_rejects_float64():
    with pytest.raises(RuntimeError, match="float64"):
        subspace_similarity(torch.randn(2, 5, 2, dtype=torch.float64), backend="triton")


def test_missing_extension_is_not_an_import_error():
    """Built or not is decided here by the import system, not by the function under test: unbuilt, the
    function returns (never raises) the ImportError naming the module; built, the module with its ops."""
    import importlib.util

    ext = cuda_extension()
    if importlib.util.find_spec("fedhpc._cuda") is None:
        assert isinstance(ext, ImportError) and "fedhpc._cuda" in str(ext)
    else:
        assert not isinstance(ext, ImportError) and hasattr(ext, "cholqr2") and hasattr(ext, "subspace_similarity")


def test_leaf_package_imports_no_fedhpc_module_and_no_triton():
    """fedhpc.kernels is the leaf package, and optional backends load lazily."""
    code = ("import sys, fedhpc.kernels; "
            "bad = [m for m in sys.modules if m.startswith('fedhpc') and m != 'fedhpc' "
            "and not m.startswith('fedhpc.kernels')]; "
            "assert not bad, bad; assert 'triton' not in sys.modules, 'triton imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])

"""Kernel tests run Triton through its interpreter on CPU tensors (no GPU in CI).

Triton decides interpreted or compiled when it decorates a kernel, i.e. when a
``fedhpc.kernels.*.triton`` module is first imported, and dispatch reads TRITON_INTERPRET again
whenever a triton backend is forced. So the variable is set only while this conftest imports the
kernel modules (then put back as it was) and, per test, by the autouse fixture below (monkeypatch
restores it): it never stays in the environment of later tests, or of the subprocesses they start
(tests/test_runtime_paths.py checks). A caller's explicit TRITON_INTERPRET is kept.
"""
import importlib
import importlib.util
import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "1")
_before = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = INTERPRET
try:
    if importlib.util.find_spec("triton") is not None:
        for _name in ("cholqr", "segment", "similarity"):
            importlib.import_module(f"fedhpc.kernels.{_name}.triton")
finally:
    if _before is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _before

import pytest  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402


@pytest.fixture(autouse=True)
def _single_threaded():
    """Test shapes are tiny, and on a 2-core box shared with other jobs, spinning thread pools
    (numpy's OpenBLAS, torch's OpenMP) stall each other: a 500 x 64 numpy QR took 1.4 s instead
    of 4 ms, a small randomized SVD 1.6 s instead of 26 ms. Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1, user_api="blas"):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _interpret_triton(monkeypatch):
    """TRITON_INTERPRET for this test only (a forced triton backend on CPU tensors reads it)."""
    monkeypatch.setenv("TRITON_INTERPRET", INTERPRET)


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    """Tests choose backends explicitly; a FEDHPC_KERNELS from the shell must not leak in."""
    monkeypatch.delenv("FEDHPC_KERNELS", raising=False)

"""Kernel tests run Triton through its interpreter on CPU tensors (no GPU in CI).

TRITON_INTERPRET must be set before triton decorates any kernel, i.e. before the
first import of a ``fedhpc.kernels.*.triton`` module; setdefault keeps a caller's
explicit choice. It leaks nothing to other test folders: automatic dispatch never
picks Triton for CPU tensors, only a forced ``backend="triton"`` does.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

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
def _no_forced_backend(monkeypatch):
    """Tests choose backends explicitly; a FEDHPC_KERNELS from the shell must not leak in."""
    monkeypatch.delenv("FEDHPC_KERNELS", raising=False)

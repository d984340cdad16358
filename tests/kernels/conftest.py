"""Kernel tests run Triton through its interpreter on CPU tensors (no GPU in CI).

TRITON_INTERPRET must be set before triton decorates any kernel, i.e. before the
first import of a ``fedhpc.kernels.*.triton`` module; setdefault keeps a caller's
explicit choice. It leaks nothing to other test folders: automatic dispatch never
picks Triton for CPU tensors, only a forced ``backend="triton"`` does.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    """Tests choose backends explicitly; a FEDHPC_KERNELS from the shell must not leak in."""
    monkeypatch.delenv("FEDHPC_KERNELS", raising=False)

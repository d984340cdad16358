"""Work whose result must not depend on the machine's thread count runs single-threaded.

A float GEMM's rounding can change with the number of threads BLAS or torch splits it over, so
data built on a 2-core laptop and on a 64-core node (or under another `OMP_NUM_THREADS`, or
rank count) would differ in the last bits, and a label near a decision boundary could flip.
Building data and planted labels is a one-off cost, so it runs on one thread of numpy's BLAS
and of torch, whatever the process uses for training; the previous settings come back after.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from threadpoolctl import threadpool_limits

__all__ = ["single_threaded"]


@contextmanager
def single_threaded():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(before)

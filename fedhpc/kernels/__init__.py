"""fedhpc.kernels: the numerical hot paths of federated LoRA aggregation.

Leaf package (imports nothing else from fedhpc). Each op lives in its own folder
with a plain torch reference (the CPU path and the test oracle), a Triton kernel
where one pays, an optional binding to the CUDA extension, and a public wrapper
that validates its inputs and dispatches (``dispatch.py``). See README.md.
"""
from .cholqr import orthonormalize
from .dispatch import BACKENDS, Backend, available_backends
from .lowrank_agg import lowrank_aggregate
from .segment import segment_sum
from .similarity import subspace_similarity

__all__ = [
    "BACKENDS", "Backend", "available_backends",
    "lowrank_aggregate", "orthonormalize", "segment_sum", "subspace_similarity",
]

"""Pairwise subspace similarity S_ij = ‖U_iᵀV_j‖_F² / min(r_i, r_j) of orthonormal bases."""
from __future__ import annotations

import torch

from ..dispatch import Backend, Impl, select

__all__ = ["subspace_similarity"]

MAX_KERNEL_RANK = 128
"""Largest basis width for the Triton and CUDA kernels: one 128 x 128 Gram tile per program."""


def _kernel_limits(U: torch.Tensor, V: torch.Tensor) -> str | None:
    """Triton/CUDA compute in float32 (float64 callers want float64 accuracy), r <= 128."""
    if torch.float64 in (U.dtype, V.dtype):
        return "computes in float32 only; float64 input goes to torch"
    if max(U.shape[-1], V.shape[-1]) > MAX_KERNEL_RANK:
        return f"r={max(U.shape[-1], V.shape[-1])} exceeds the kernel limit {MAX_KERNEL_RANK}"
    return None


IMPLS = (
    Impl("cuda", f"{__name__}.cuda", "similarity_cuda", _kernel_limits),
    Impl("triton", f"{__name__}.triton", "similarity_triton", _kernel_limits),
    Impl("torch", f"{__name__}.reference", "similarity_reference"),
)


def _ranks(ranks: torch.Tensor | None, count: int, width: int, name: str, device) -> torch.Tensor:
    if ranks is None:
        return torch.full((count,), width, dtype=torch.int64, device=device)
    if not isinstance(ranks, torch.Tensor) or ranks.shape != (count,) or ranks.is_floating_point():
        raise ValueError(f"{name} must be an integer tensor [{count}], got "
                         f"{getattr(ranks, 'dtype', type(ranks).__name__)} {tuple(getattr(ranks, 'shape', ()))}")
    lo, hi = (int(v) for v in ranks.aminmax()) if count else (0, 0)  # host sync: validation
    if lo < 0 or hi > width:
        raise ValueError(f"{name} must lie in [0, {width}], got values in [{lo}, {hi}]")
    return ranks.to(device=device, dtype=torch.int64)


def subspace_similarity(U: torch.Tensor, V: torch.Tensor | None = None, *,
                        ranks_u: torch.Tensor | None = None, ranks_v: torch.Tensor | None = None,
                        backend: Backend | None = None) -> torch.Tensor:
    """Mean squared cosine of the principal angles between every pair of subspaces.

    Args:
        U: orthonormal bases ``[n, d, r]`` (columns of each ``U[i]`` orthonormal).
        V: orthonormal bases ``[m, d, r']``; None compares U with itself (symmetric,
            half the work).
        ranks_u: integer ``[n]``, true rank of each basis; columns at or beyond it are ignored.
        ranks_v: integer ``[m]``, same for V (with V None, ranks_u is used).
        backend: force "cuda", "triton" or "torch" (default: ``FEDHPC_KERNELS`` or automatic).

    Returns:
        S ``[n, m]`` (``[n, n]`` without V), S_ij = ‖U_iᵀV_j‖_F² / min(r_i, r_j), in
        float32 (float64 for float64 input). Dividing by the smaller rank keeps S in
        [0, 1], with 1 exactly when one subspace contains the other; for equal ranks
        it is the mean cos² of the principal angles. Pairs with a rank-0 basis get 0.
    """
    if not isinstance(U, torch.Tensor) or U.ndim != 3:
        raise ValueError(f"U must be a tensor [n, d, r], got shape {tuple(getattr(U, 'shape', ()))}")
    if V is not None and (not isinstance(V, torch.Tensor) or V.ndim != 3 or V.shape[1] != U.shape[1]):
        raise ValueError(f"V must be a tensor [m, d={U.shape[1]}, r], got shape {tuple(getattr(V, 'shape', ()))}")
    if V is None and ranks_v is not None:
        raise ValueError("ranks_v needs V; without V the ranks of U (ranks_u) are used on both sides")
    for name, T in (("U", U), ("V", V)):
        if T is not None and not T.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {T.dtype}")
    n, d, r = U.shape
    ranks_u = _ranks(ranks_u, n, r, "ranks_u", U.device)
    ranks_v = ranks_u if V is None else _ranks(ranks_v, V.shape[0], V.shape[2], "ranks_v", U.device)
    if V is not None and V.dtype != U.dtype:
        U, V = (T.to(torch.promote_types(U.dtype, V.dtype)) for T in (U, V))
    if U.dtype not in (torch.float32, torch.float64):
        U, V = U.float(), None if V is None else V.float()
    m = n if V is None else V.shape[0]
    if n == 0 or m == 0 or d == 0:
        return U.new_zeros(n, m)
    fn = select("subspace_similarity", IMPLS, U, U if V is None else V, backend=backend)
    return fn(U, V, ranks_u, ranks_v)

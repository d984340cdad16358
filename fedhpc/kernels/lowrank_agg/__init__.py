"""Exact or randomized rank-k SVD of the aggregate Σ_k w_k B_k A_k, computed through the factors."""
from __future__ import annotations

import functools
from typing import Literal, Sequence

import torch

from ..cholqr import orthonormalize
from ..dispatch import Backend
from .reference import exact_svd, prefer_randomized, randomized_svd

__all__ = ["lowrank_aggregate"]

Method = Literal["auto", "exact", "randomized"]
Factors = torch.Tensor | Sequence[torch.Tensor]


def _shape(T) -> tuple:
    return tuple(getattr(T, "shape", ()))


def _stack_tensors(B: torch.Tensor, A: torch.Tensor, w: torch.Tensor, ranks: torch.Tensor | None):
    """``B [.., K, d_out, r]``, ``A [.., K, r, d_in]`` -> Bw ``[.., d_out, R]``, At ``[.., d_in, R]``."""
    *batch, K, d_out, r = B.shape
    if A.ndim != B.ndim or A.shape[:-1] != (*batch, K, r):
        raise ValueError(f"B [L?, K, d_out, r] and A [L?, K, r, d_in] must agree, got B {_shape(B)}, A {_shape(A)}")
    Bw = (B * w[:, None, None]).movedim(-3, -2).reshape(*batch, d_out, K * r)   # [.., d_out, K·r]
    At = A.reshape(*batch, K * r, A.shape[-1]).mT                              # [.., d_in, K·r]
    if ranks is not None:
        if not isinstance(ranks, torch.Tensor) or ranks.shape != (K,) or ranks.is_floating_point():
            raise ValueError(f"ranks must be an integer tensor [K={K}], got {_shape(ranks)}")
        lo, hi = (int(v) for v in ranks.aminmax())  # host sync: validation and the column gather
        if lo < 0 or hi > r:
            raise ValueError(f"ranks must lie in [0, {r}], got values in [{lo}, {hi}]")
        keep = (torch.arange(r, device=ranks.device) < ranks[:, None]).flatten().nonzero().flatten()
        Bw, At = Bw[..., keep.to(B.device)], At[..., keep.to(B.device)]
    return Bw, At


def _stack_lists(B: Sequence[torch.Tensor], A: Sequence[torch.Tensor], w: torch.Tensor):
    """Lists of ``B_k [.., d_out, r_k]`` and ``A_k [.., r_k, d_in]`` -> Bw, At as above."""
    for k, (Bk, Ak) in enumerate(zip(B, A)):
        if (not isinstance(Bk, torch.Tensor) or not isinstance(Ak, torch.Tensor) or Bk.ndim < 2
                or Ak.shape[:-2] != Bk.shape[:-2] or Ak.shape[-2] != Bk.shape[-1]
                or Bk.shape[:-1] != B[0].shape[:-1] or Ak.shape[-1] != A[0].shape[-1]):
            raise ValueError(f"client {k}: B_k must be [.., d_out, r_k] and A_k [.., r_k, d_in] with "
                             f"d_out, d_in, leading dims shared, got B_k {_shape(Bk)}, A_k {_shape(Ak)}")
    Bw = torch.cat([Bk.to(w.dtype) * wk for Bk, wk in zip(B, w)], dim=-1)
    At = torch.cat([Ak.to(w.dtype).mT for Ak in A], dim=-1)
    return Bw, At


def _stacked_factors(B: Factors, A: Factors, weights: torch.Tensor, ranks: torch.Tensor | None):
    """Validate either input form and return Bw ``[.., d_out, R]``, At ``[.., d_in, R]``.

    Computes in float32, or float64 when any input is float64.
    """
    is_list = isinstance(B, (list, tuple))
    if is_list != isinstance(A, (list, tuple)) or (is_list and (len(B) != len(A) or not B)):
        raise ValueError("B and A must both be tensors or both be non-empty lists of equal length, got "
                         f"{type(B).__name__} of {len(B) if is_list else _shape(B)} and "
                         f"{type(A).__name__} of {len(A) if isinstance(A, (list, tuple)) else _shape(A)}")
    if not is_list and (not isinstance(B, torch.Tensor) or not isinstance(A, torch.Tensor) or B.ndim not in (3, 4)):
        raise ValueError(f"B must be [K, d_out, r] or [L, K, d_out, r] (A alike), got {_shape(B)}, {_shape(A)}")
    K = len(B) if is_list else B.shape[-3]
    if not isinstance(weights, torch.Tensor) or weights.shape != (K,):
        raise ValueError(f"weights must be a tensor [K={K}], got {_shape(weights)}")
    if is_list and ranks is not None:
        raise ValueError("ranks applies to padded stacked tensors; lists already carry each r_k")
    tensors = [*B, *A] if is_list else [B, A]
    dtype = torch.float64 if any(getattr(T, "dtype", None) == torch.float64 for T in (*tensors, weights)) \
        else torch.float32
    w = weights.to(device=tensors[0].device, dtype=dtype)
    if is_list:
        return _stack_lists(B, A, w)
    return _stack_tensors(B.to(dtype), A.to(dtype), w, ranks)


def lowrank_aggregate(B: Factors, A: Factors, weights: torch.Tensor, *, rank: int,
                      ranks: torch.Tensor | None = None, method: Method = "auto",
                      oversample: int | None = None, power_iters: int = 4, seed: int = 0,
                      backend: Backend | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD U diag(S) Vh of M = Σ_k weights[k] · B_k A_k, without forming M.

    Args:
        B: ``[K, d_out, r]`` or ``[L, K, d_out, r]`` (L layers of equal shape), or a
            list of K tensors ``[.., d_out, r_k]`` with different ranks.
        A: ``[K, r, d_in]`` or ``[L, K, r, d_in]``, or a list of ``[.., r_k, d_in]``.
        weights: ``[K]``.
        rank: number of singular triplets kept, 1 <= rank <= min(d_out, d_in).
        ranks: integer ``[K]`` true rank per client for padded stacked factors; columns
            of B_k and rows of A_k at or beyond it are dropped.
        method: "exact" (QR of the stacked factors, R x R core SVD), "randomized"
            (range finder through the factors), or "auto": exact unless its estimated
            cost exceeds 4x the randomized one, which happens as R = Σ r_k grows
            toward min(d_out, d_in) (reference.py has the cost model).
        oversample: extra sketch columns for "randomized"; default max(rank, 16),
            i.e. a sketch of at least 2·rank columns.
        power_iters: power iterations for "randomized". Subspace error shrinks like
            (σ_{rank+1}/σ_rank)^(2q+1): the default 4 matches the exact top subspace to
            ~1e-6 when σ_{rank+1}/σ_rank <= 0.3 (tested); flatter spectra need more,
            or method="exact".
        seed: seed of the Gaussian test matrix (results are reproducible).
        backend: forced backend for the orthonormalisations inside (see ``orthonormalize``).

    Returns:
        U ``[.., d_out, rank]``, S ``[.., rank]`` (descending), Vh ``[.., rank, d_in]``, in
        float32 (float64 if any input is float64).
    """
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(f"method must be 'auto', 'exact' or 'randomized', got {method!r}")
    if (oversample is not None and oversample < 0) or power_iters < 0:
        raise ValueError(f"oversample and power_iters must be >= 0, got {oversample}, {power_iters}")
    Bw, At = _stacked_factors(B, A, weights, ranks)
    d_out, d_in, R = Bw.shape[-2], At.shape[-2], Bw.shape[-1]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(d_out, d_in):
        raise ValueError(f"rank must be an int in [1, min(d_out={d_out}, d_in={d_in})], got {rank!r}")
    if R < rank:  # zero columns: the missing singular values are 0, their vectors arbitrary
        Bw, At = (torch.nn.functional.pad(T, (0, rank - R)) for T in (Bw, At))
        R = rank
    orth = functools.partial(orthonormalize, backend=backend)
    sketch = min(rank + (max(rank, 16) if oversample is None else oversample), d_out, d_in)
    if method == "randomized" or (method == "auto" and prefer_randomized(R, d_out, d_in, sketch, power_iters)):
        return randomized_svd(Bw, At, rank, orth, sketch=sketch, power_iters=power_iters, seed=seed)
    return exact_svd(Bw, At, rank, orth)

"""Pairwise subspace similarity in plain torch: row-blocked GEMM plus an r x r block reduction.

S_ij = ‖U_iᵀV_j‖_F² / min(r_i, r_j). Stacking Uᵀ as ``[n·r, d]`` and V as
``[d, m·r]`` makes every pair one tile of a single GEMM; each r x r tile is reduced
to a scalar right away, so only a ``[rows·r, m·r]`` slab of the Gram exists at a
time (``SLAB_BYTES``), never the whole ``[n·r, m·r]`` matrix (102 GB at n = 1e4,
r = 16). Without V the result is symmetric and only slabs right of the diagonal
block are computed (half the flops), then mirrored.
"""
from __future__ import annotations

import torch

SLAB_BYTES = 32 << 20
"""Gram slab budget: at n = 500, r = 16 it is 64 bases per slab, the fastest of 8-64 MiB
on the 2-core CI box (larger GEMMs vs. a smaller wasted lower half of the diagonal blocks)."""


def mask_columns(U: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Zero the columns of ``U [n, d, r]`` at or beyond each basis' rank."""
    keep = torch.arange(U.shape[-1], device=U.device) < ranks.to(U.device)[:, None]
    return U * keep[:, None, :].to(U.dtype)


def _masked(U: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """mask_columns, skipped (no copy) when every rank is full; a host sync on CUDA."""
    return mask_columns(U, ranks) if bool((ranks < U.shape[-1]).any()) else U


def normalise(sq: torch.Tensor, ranks_u: torch.Tensor, ranks_v: torch.Tensor) -> torch.Tensor:
    """Divide ‖U_iᵀV_j‖_F² by min(r_i, r_j); pairs with an empty basis get 0."""
    rmin = torch.minimum(ranks_u[:, None], ranks_v[None, :]).to(sq.dtype)
    return torch.where(rmin > 0, sq / rmin.clamp_min(1), torch.zeros_like(sq))


def similarity_reference(U: torch.Tensor, V: torch.Tensor | None,
                         ranks_u: torch.Tensor, ranks_v: torch.Tensor) -> torch.Tensor:
    """S ``[n, m]`` for bases ``U [n, d, r]``, ``V [m, d, r']`` (V None: V = U, ranks_v = ranks_u)."""
    symmetric = V is None
    U = _masked(U, ranks_u)
    V = U if symmetric else _masked(V, ranks_v)
    (n, d, ru), (m, _, rv) = U.shape, V.shape
    Ut = U.transpose(1, 2).reshape(n * ru, d)                     # [n·ru, d]
    Vs = V.permute(1, 0, 2).reshape(d, m * rv)                    # [d, m·rv]
    S = U.new_zeros(n, m)
    rows = max(1, SLAB_BYTES // (U.element_size() * ru * m * rv))
    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        j0 = i0 if symmetric else 0
        G = Ut[i0 * ru:i1 * ru] @ Vs[:, j0 * rv:]                 # [(i1-i0)·ru, (m-j0)·rv]
        S[i0:i1, j0:] = G.square_().view(i1 - i0, ru, m - j0, rv).sum(3).sum(1)
    if symmetric:
        S = S.triu() + S.triu(1).mT
    return normalise(S, ranks_u, ranks_v)

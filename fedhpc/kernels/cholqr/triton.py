"""CholeskyQR2 as three streaming Triton launches, the r x r Cholesky in torch between them.

    launch 1  G₁ = XᵀX                      read X
    torch     R₁ = chol(G₁), W₁ = R₁⁻¹
    launch 2  G₂ = (XW₁)ᵀ(XW₁)              read X   (Q₁ is recomputed, never stored)
    torch     R₂ = chol(G₂), W₂ = R₂⁻¹
    launch 3  Q = (XW₁)W₂                   read X, write Q

Traffic is 3 reads + 1 write of a d x r matrix, against 5+ passes for unfused
torch ops (kernels_hpc.md §1.1). One program streams one matrix in BLOCK_D-row tiles;
r is padded with zeros to RP = max(16, next power of two) because tl.dot needs
every dimension >= 16. All dots use input_precision="ieee": TF32 would cost three
decimal digits of orthogonality.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import accepted, cholesky_inverse_factors, finish_with_fallback


@triton.jit
def _gram_kernel(X, W, G, d, r, sxb, sxd, sxr,
                 HAS_W: tl.constexpr, RP: tl.constexpr, BLOCK_D: tl.constexpr):
    """G[b] = (X[b] W[b])ᵀ (X[b] W[b]) (W = I when not HAS_W); G and W are [b, RP, RP]."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_D)
    cols = tl.arange(0, RP)
    square = b * RP * RP + cols[:, None] * RP + cols[None, :]
    if HAS_W:
        w = tl.load(W + square)
    acc = tl.zeros((RP, RP), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        mask = ((d0 + rows)[:, None] < d) & (cols[None, :] < r)
        x = tl.load(X + b * sxb + (d0 + rows)[:, None] * sxd + cols[None, :] * sxr,
                    mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            x = tl.dot(x, w, input_precision="ieee")
        acc += tl.dot(tl.trans(x), x, input_precision="ieee")
    tl.store(G + square, acc)


@triton.jit
def _apply_kernel(X, W1, W2, Q, d, r, sxb, sxd, sxr,
                  RP: tl.constexpr, BLOCK_D: tl.constexpr):
    """Q[b] = (X[b] W1[b]) W2[b], the first product computed as _gram_kernel did; Q is [b, d, r]."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_D)
    cols = tl.arange(0, RP)
    square = b * RP * RP + cols[:, None] * RP + cols[None, :]
    w1 = tl.load(W1 + square)
    w2 = tl.load(W2 + square)
    for d0 in range(0, d, BLOCK_D):
        mask = ((d0 + rows)[:, None] < d) & (cols[None, :] < r)
        x = tl.load(X + b * sxb + (d0 + rows)[:, None] * sxd + cols[None, :] * sxr,
                    mask=mask, other=0.0).to(tl.float32)
        q = tl.dot(tl.dot(x, w1, input_precision="ieee"), w2, input_precision="ieee")
        tl.store(Q + b * d * r + (d0 + rows)[:, None] * r + cols[None, :], q, mask=mask)


def launch_config(r: int) -> dict:
    """Constexprs and warps for width r <= 64: RP = max(16, next pow2), 4-8 KiB X tiles.

    At RP = 64 the W, X·W and Gram tiles need 8 warps and BLOCK_D = 32 to stay out of
    local memory (no spills in tools/aot_compile_triton.py for sm_90).
    """
    rp = max(16, triton.next_power_of_2(r))
    return dict(RP=rp, BLOCK_D=64 if rp <= 32 else 32, num_warps=4 if rp <= 32 else 8)


def _pad(W: torch.Tensor, rp: int) -> torch.Tensor:
    out = W.new_zeros(W.shape[0], rp, rp)
    out[:, :W.shape[1], :W.shape[2]] = W
    return out


def cholqr2_triton(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``cholqr2_reference``: X [b, d, r] (fp32/fp16/bf16) -> fp32 Q, R."""
    b, d, r = X.shape
    cfg = launch_config(r)
    rp, strides = cfg["RP"], (d, r, *X.stride())

    def gram(W: torch.Tensor | None) -> torch.Tensor:
        G = X.new_empty(b, rp, rp, dtype=torch.float32)
        _gram_kernel[(b,)](X, G if W is None else W, G, *strides, HAS_W=W is not None, **cfg)
        return G[:, :r, :r]

    R1, W1, ok1 = cholesky_inverse_factors(gram(None))
    W1p = _pad(W1, rp)
    G2 = gram(W1p)
    R2, W2, ok2 = cholesky_inverse_factors(G2)
    Q = X.new_empty(b, d, r, dtype=torch.float32)
    _apply_kernel[(b,)](X, W1p, _pad(W2, rp), Q, *strides, **cfg)
    return finish_with_fallback(X.float(), Q, R2 @ R1, accepted(ok1, ok2, G2))  # fallback in fp32

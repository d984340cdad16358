"""HiLoRA's tiers: which rank slice each tier holds, the hooks that train one tier at a time, and
how a tier's new factors come out of the reduction (see hilora.py for the method)."""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from ..kernels import lowrank_aggregate
from ..runtime.exchange import Means, Rows
from .base import LocalHooks, is_head

__all__ = ["ROOT", "CLUSTER", "LEAF", "STAGES", "Aggregation", "tier_slice", "TierHooks", "tier_tensors",
           "aggregate_tier", "relative_change"]

ROOT, CLUSTER, LEAF = 0, 1, 2
STAGES = ("root", "cluster", "leaf")
Aggregation = Literal["product_dense", "product_gather", "factor_mean"]


def tier_slice(tier: int, r: int) -> slice:
    """Rank slice of a tier in the stacked [root | cluster | leaf] adapter."""
    return slice(tier * r, (tier + 1) * r)


class TierHooks(LocalHooks):
    """Train one tier: only its A rows and B columns may move; penalise B's overlap with the
    frozen tiers above it (||B_fᵀ B||_F², algorithms.md K10)."""

    def __init__(self, modules: list[str], rank: int, active: int, gamma_cluster: float, gamma_leaf: float,
                 train_head: bool = True, lr_scale: float = 1.0):
        self.modules, self.r, self.active, self.train_head = modules, rank, active, train_head
        self.lr_scale = lr_scale
        self.gammas = {ROOT: gamma_cluster, CLUSTER: gamma_leaf}

    def loss(self, adapters, start):
        if self.active == ROOT:
            return None
        total = 0.0
        for m in self.modules:
            B = adapters[f"{m}.lora_B"]
            live = B[..., tier_slice(self.active, self.r)]
            for frozen in range(self.active):
                if self.gammas[frozen]:
                    above = B[..., tier_slice(frozen, self.r)].detach()
                    total = total + self.gammas[frozen] * (above.mT @ live).square().sum((1, 2))
        return total if torch.is_tensor(total) else None

    def movable(self, key):
        """The active tier's A rows / B columns, and the head unless frozen: local training masks
        gradients and updates to them, so not even weight decay moves a frozen tier."""
        if is_head(key):
            return None if self.train_head else torch.zeros((), dtype=torch.bool)
        for m in self.modules:
            for suffix, shape in ((".lora_A", (1, 3 * self.r, 1)), (".lora_B", (1, 1, 3 * self.r))):
                if key == m + suffix:
                    mask = torch.zeros(3 * self.r, dtype=torch.bool)
                    mask[tier_slice(self.active, self.r)] = True
                    return mask.view(shape)
        return None


def tier_tensors(modules: list[str], mode: str, A: dict, B: dict) -> tuple[dict, dict]:
    """(averaged, gathered) per-client tensors or shapes of a tier, by aggregation mode.
    `A`, `B` map module -> tensor `[C, r, d_in]` / `[C, d_out, r]`, or -> shape."""
    if mode == "product_dense":
        product = {f"{m}.delta": (B[m] @ A[m] if torch.is_tensor(A[m]) else (B[m][0], A[m][1]))
                   for m in modules}
        return product, {}
    factors = {**{f"{m}.tier_A": A[m] for m in modules}, **{f"{m}.tier_B": B[m] for m in modules}}
    return (factors, {}) if mode == "factor_mean" else ({}, factors)


def aggregate_tier(m: str, means: Means, rows: Rows | None, mode: str, groups: torch.Tensor | None, count: int,
                   r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """New (A `[G, r, d_in]`, B `[G, d_out, r]`) of module m for every group, from the tier's
    group means or its gathered rows."""
    if mode == "factor_mean":
        return means.values[f"{m}.tier_A"], means.values[f"{m}.tier_B"]
    if mode == "product_dense":
        U, S, Vh = torch.linalg.svd(means.values[f"{m}.delta"].double(), full_matrices=False)
        return (S[..., :r, None] * Vh[..., :r, :]).float(), U[..., :r].float()
    Bs, As, w = rows.values[f"{m}.tier_B"], rows.values[f"{m}.tier_A"], rows.weights
    out_A = torch.zeros(count, r, As.shape[-1])
    out_B = torch.zeros(count, Bs.shape[-2], r)
    for g in range(count):  # a few clusters: each is one batched-factor SVD
        sel = (groups == g) if groups is not None else torch.ones(len(w), dtype=torch.bool)
        if bool(sel.any()):
            U, S, Vh = lowrank_aggregate(Bs[sel], As[sel], w[sel] / w[sel].sum(), rank=r, method="exact")
            out_A[g], out_B[g] = (S[:, None] * Vh).float(), U.float()
    return out_A, out_B


def relative_change(modules: list[str], old, new) -> float:
    """||s B'A' - s BA||_F / ||s BA||_F over all matrices, through r x r Grams (s cancels)."""
    diff = norm = 0.0
    for m in modules:
        A0, B0 = old[f"{m}.root_A"][0].double(), old[f"{m}.root_B"][0].double()
        A1, B1 = new[f"{m}.root_A"][0].double(), new[f"{m}.root_B"][0].double()
        X, Y = torch.cat([B1, -B0], dim=1), torch.cat([A1, A0], dim=0)
        diff += float(torch.trace((X.mT @ X) @ (Y @ Y.mT)))
        norm += float(torch.trace((B0.mT @ B0) @ (A0 @ A0.mT)))
    return float(np.sqrt(max(diff, 0.0)) / (np.sqrt(norm) + 1e-12))

"""FlexLoRA: the exact weighted product, redistributed at each client's own rank by truncated SVD.

Paper: Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
Client Resources", NeurIPS 2024, arXiv 2402.11505. Spec: algorithms.md §2.6.

    ΔW = Σ_k p_k s_k B_k A_k = U Σ Vᵀ          (through the factors: kernels.lowrank_aggregate)
    server: B = U_{r_max} √Σ ,  A = √Σ V_{r_max}ᵀ     (product units)
    client k: B_k = B[:, :r_k] ,  A_k = A[:r_k] / s_k   so  s_k B_k A_k = top-r_k part of ΔW
    head <- Σ_k p_k head_k

The √Σ split on both factors follows FedLLM-Factory; the 1/s_k sits on A (that code uses a
fixed s=2 on B). The dense ΔW is never formed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..kernels import lowrank_aggregate
from .base import StrategyConfig, register_strategy
from .factors import FactorStrategy

__all__ = ["FlexLoRAConfig", "FlexLoRA", "svd_factors"]


@dataclass(kw_only=True)
class FlexLoRAConfig(StrategyConfig):
    svd_method: Literal["auto", "exact", "randomized"] = "exact"
    """How `lowrank_aggregate` computes the truncated SVD (exact: QR of the stacked factors)."""


def svd_factors(part, weights, rank: int, method: str = "exact"):
    """B = U √Σ `[d_out, rank]`, A = √Σ Vᵀ `[rank, d_in]` of Σ_k weights_k B_k A_k (float64)."""
    U, S, Vh = lowrank_aggregate(part.B, part.A, weights, rank=rank, ranks=part.ranks, method=method)
    root = S.clamp(min=0).sqrt()
    return U * root, root.unsqueeze(1) * Vh


@register_strategy("flexlora")
class FlexLoRA(FactorStrategy):
    Config = FlexLoRAConfig
    product_units = True

    def aggregate_train(self, server, reduced, *, round_index):
        new = super().aggregate_train(server, reduced, round_index=round_index)  # the head's mean
        for m in self.modules:
            part = self.gathered_factors(reduced, m)
            B, A = svd_factors(part, part.p * part.s, self.ranks.max, self.cfg.svd_method)
            new[f"{m}.lora_B"] = self.store(B, server[f"{m}.lora_B"])
            new[f"{m}.lora_A"] = self.store(A, server[f"{m}.lora_A"])
        return new

"""FedEx-LoRA: FedAvg of the factors plus the exact residual folded into the frozen weight.

Paper: Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning
of Foundation Models", ACL 2025, arXiv 2410.09432. Spec: algorithms.md §2.9.

    Ā = Σ_k p_k pad(A_k) ,  B̄ = Σ_k p_k pad(B_k)
    ΔW_res = Σ_k p_k s_k B_k A_k − s_max B̄ Ā
    W <- W + ΔW_res   (the shared `base_delta`),   clients restart from (B̄, Ā)
so the global model W + s_max B̄ Ā equals W + Σ_k p_k s_k B_k A_k exactly. With homogeneous
ranks s_max = s_k and this is the paper's equation; with heterogeneous ranks a client of rank
r_k < r_max restarts from the truncation of (B̄, Ā), which is not the global model.
The residual is sent down as factors ([B_1 … B_P, −B̄], [p s A; Ā]: rank ≤ Σ r_k + r_max).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..models.cohort import base_delta_key
from .base import StrategyConfig, register_strategy
from .factors import FactorStrategy, padded_mean, weighted_factors

__all__ = ["FedExLoRAConfig", "FedExLoRA"]


@dataclass(kw_only=True)
class FedExLoRAConfig(StrategyConfig):
    pass


@register_strategy("fedex_lora")
class FedExLoRA(FactorStrategy):
    Config = FedExLoRAConfig

    def init_server(self, init, *, frozen):
        return {**super().init_server(init, frozen=frozen), **self.zero_deltas(init)}

    def down_ranks(self, participants):
        return self.ranks.ranks + int(self.ranks.ranks[participants].sum()) + self.ranks.max

    def aggregate_train(self, server, reduced, *, round_index):
        new = super().aggregate_train(server, reduced, round_index=round_index)  # the head's mean
        for m in self.modules:
            part = self.gathered_factors(reduced, m)
            a_mean, b_mean = padded_mean(part.A, part.p), padded_mean(part.B, part.p)
            Bc, Ac = weighted_factors(part, part.p * part.s)
            residual = Bc @ Ac - self.ranks.max_scaling * (b_mean @ a_mean)
            key = base_delta_key(m)
            new[key] = server[key] + residual.unsqueeze(0).to(server[key].dtype)
            new[f"{m}.lora_A"] = self.store(a_mean, server[f"{m}.lora_A"])
            new[f"{m}.lora_B"] = self.store(b_mean, server[f"{m}.lora_B"])
        return new

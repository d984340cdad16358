"""LoRA-FAIR: FedAvg of the factors, with the averaged B corrected toward the exact product.

Paper: Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization
Refinement", ICCV 2025, arXiv 2411.14961. Spec: algorithms.md §2.10.

    Ā = Σ_k p_k pad(A_k) ,  B̄ = Σ_k p_k pad(B_k) ,  T = Σ_k p_k B_k A_k
    ΔB = (T − B̄ Ā) Āᵀ (Ā Āᵀ + λ I)⁻¹        (ridge least squares: min ‖T − (B̄+ΔB)Ā‖² + λ‖ΔB‖²)
    clients restart from (B̄ + ΔB, Ā) ;  head <- Σ_k p_k head_k

This is the closed form the ILoRA authors use for their LoRA-FAIR baseline (`lambda_reg`);
the paper solves a cosine-similarity objective by server-side SGD. Like that code (and FedIT's
zero padding) T ignores the clients' scalings; `scale_across_ranks` weights client k by
s_k / s_max instead (T in units of the rank-r_max scaling) [reconstructed]: the correction then
serves the rank-r_max global model but distorts what low-rank clients restart from (their
truncation is applied at their larger s_k). Equal ranks: both are the same. (T − B̄Ā)Āᵀ is
computed through the factors, Σ_k p_k B_k (A_k Āᵀ) − B̄ (Ā Āᵀ): no d_out × d_in matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import StrategyConfig, register_strategy
from .factors import FactorStrategy, padded_mean, weighted_factors

__all__ = ["LoRAFAIRConfig", "LoRAFAIR"]


@dataclass(kw_only=True)
class LoRAFAIRConfig(StrategyConfig):
    lambda_reg: float = 0.01
    """Ridge weight λ of the correction ΔB."""
    scale_across_ranks: bool = False
    """Weight client k's product by s_k / s_max in the target [reconstructed]; false: as the closed form's code."""

    def __post_init__(self):
        if self.lambda_reg < 0:
            raise ValueError(f"lambda_reg must be >= 0, got {self.lambda_reg}")


@register_strategy("lora_fair")
class LoRAFAIR(FactorStrategy):
    Config = LoRAFAIRConfig

    def aggregate_train(self, server, reduced, *, round_index):
        new = super().aggregate_train(server, reduced, round_index=round_index)  # the head's mean
        r_max = self.ranks.max
        for m in self.modules:
            part = self.gathered_factors(reduced, m)
            a_mean, b_mean = padded_mean(part.A, part.p), padded_mean(part.B, part.p)
            weights = part.p * part.s / self.ranks.max_scaling if self.cfg.scale_across_ranks else part.p
            Bc, Ac = weighted_factors(part, weights)
            gram = a_mean @ a_mean.mT
            rhs = Bc @ (Ac @ a_mean.mT) - b_mean @ gram
            delta = torch.linalg.solve(gram + self.cfg.lambda_reg * torch.eye(r_max, dtype=gram.dtype), rhs.mT).mT
            new[f"{m}.lora_A"] = self.store(a_mean, server[f"{m}.lora_A"])
            new[f"{m}.lora_B"] = self.store(b_mean + delta, server[f"{m}.lora_B"])
        return new

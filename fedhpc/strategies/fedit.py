"""FedIT (FedAvg-LoRA): factor-wise weighted mean of A, B and the head.

Paper: Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning",
arXiv 2305.05644. Spec: algorithms.md §2.1.

    A <- Σ_k p_k A_k ;  B <- Σ_k p_k B_k ;  head <- Σ_k p_k head_k ;  p_k = n_k / Σ_j n_j

Factor-wise averaging is biased: B̄Ā ≠ Σ_k p_k B_k A_k (the methods of issue 5 fix this).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Strategy, StrategyConfig, is_head, register_strategy


@dataclass(kw_only=True)
class FedITConfig(StrategyConfig):
    aggregate_head: bool = True
    """Average the classifier head too; false keeps each client's head private (as Fed-HeLLo's code does)."""


@register_strategy("fedit")
class FedIT(Strategy):
    Config = FedITConfig

    def private(self) -> list[str]:
        return [] if self.cfg.aggregate_head else [k for k in self.keys if is_head(k)]

"""FedSA-LoRA: share A, keep B (and the head) private to each client.

Paper: Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning",
ICLR 2025, arXiv 2410.01463. Spec: algorithms.md §2.8.

    A <- Σ_k p_k A_k ;  B_k, head_k stay on client k

A learns what clients share, B what is theirs; evaluation is personalized.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Strategy, StrategyConfig, is_head, is_lora_a, register_strategy


@dataclass(kw_only=True)
class FedSALoRAConfig(StrategyConfig):
    share_head: bool = False
    """Average the head with A (the official config keeps the classifier local)."""


@register_strategy("fedsa_lora")
class FedSALoRA(Strategy):
    Config = FedSALoRAConfig

    def private(self) -> list[str]:
        return [k for k in self.keys if not (is_lora_a(k) or (self.cfg.share_head and is_head(k)))]

    def global_model(self, server, init):
        return None  # B and the head are private: there is no meaningful global model

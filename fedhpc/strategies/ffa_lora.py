"""FFA-LoRA: A frozen at its shared random init, only B (and the head) trained and averaged.

Paper: Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024,
arXiv 2403.12313. Spec: algorithms.md §2.4.

    A_k = A_0 (never trained, never sent: every client derives it from the shared seed)
    B <- Σ_k p_k B_k    so   B̄ A_0 = Σ_k p_k B_k A_0   (aggregation is exact)

The paper recommends a larger lora_alpha to make up for the frozen A.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Block, Exchange, RoundPlan, Strategy, StrategyConfig, Task, is_lora_a, register_strategy


@dataclass(kw_only=True)
class FFALoRAConfig(StrategyConfig):
    pass


@register_strategy("ffa_lora")
class FFALoRA(Strategy):
    Config = FFALoRAConfig

    def configure_train(self, server, sampled, seen):
        sent = {k: s for k, s in self.shapes.items() if not is_lora_a(k)}
        return RoundPlan(sampled, Exchange({"shared": Block(sent)}, down=sent))

    def configure_client(self, server, state, clients, task):
        plan = super().configure_client(server, state, clients, task)
        if task == Task.TRAIN:
            plan.trainable = [k for k in plan.trainable if not is_lora_a(k)]
        return plan

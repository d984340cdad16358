"""FLoRA: stack every client's factors, merge the stacked product into the frozen weight, restart.

Paper: Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations", NeurIPS 2024, arXiv 2409.05976. Spec: algorithms.md §2.5.

    A_stack = [p_1 s_1 A_1; … ; p_P s_P A_P] ,  B_stack = [B_1 … B_P]
    W <- W + B_stack A_stack = W + Σ_k p_k s_k B_k A_k      (the shared `base_delta`; exact)
    every client restarts from a fresh LoRA: A re-initialised, B = 0 ;  head <- Σ_k p_k head_k

Clients receive the whole stack ((Σ r_k)(d_in + d_out) per module: it grows with the
cohort). `reinit: fresh` draws A anew each round (peft's Kaiming-uniform, keyed by the round,
so every rank draws the same); `initial` restarts from the run's initial A.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..models.cohort import base_delta_key
from ..rng import Purpose, keyed_torch_generator
from .base import StrategyConfig, register_strategy
from .factors import FactorStrategy, weighted_factors

__all__ = ["FLoRAConfig", "FLoRA"]


@dataclass(kw_only=True)
class FLoRAConfig(StrategyConfig):
    reinit: Literal["fresh", "initial"] = "fresh"
    """A after each merge: fresh: a new Kaiming-uniform draw per round; initial: the run's initial A."""


@register_strategy("flora")
class FLoRA(FactorStrategy):
    Config = FLoRAConfig

    def init_server(self, init, *, frozen):
        return {**super().init_server(init, frozen=frozen), **self.zero_deltas(init)}

    def down_ranks(self, participants):
        return np.full(self.population.size, int(self.ranks.ranks[participants].sum()))

    def aggregate_train(self, server, reduced, *, round_index):
        new = super().aggregate_train(server, reduced, round_index=round_index)  # the head's mean
        for index, m in enumerate(self.modules):
            part = self.gathered_factors(reduced, m)
            Bc, Ac = weighted_factors(part, part.p * part.s)
            key = base_delta_key(m)
            new[key] = server[key] + (Bc @ Ac).unsqueeze(0).to(server[key].dtype)
            new[f"{m}.lora_B"] = torch.zeros_like(server[f"{m}.lora_B"])
            if self.cfg.reinit == "fresh":
                a = server[f"{m}.lora_A"]
                gen = keyed_torch_generator(self.population.seed, round_index, index, purpose=Purpose.LORA_REINIT)
                bound = 1.0 / a.shape[-1] ** 0.5  # kaiming_uniform_(a=sqrt(5)) on [r, d_in], as peft
                fresh = torch.rand(a.shape, generator=gen, dtype=torch.float64) * (2 * bound) - bound
                new[f"{m}.lora_A"] = fresh.to(device=a.device, dtype=a.dtype)
        return new

"""Exclusive: only the clients whose budget covers every layer train; the others contribute nothing.

The Fed-HeLLo code's baseline (config `0_0_12`: groups 0 and 1 get no layers, group 2 all of
them); spec: algorithms.md §2.12. As there, a sampled low-capacity client still takes part (it
receives the model and trains nothing but its local copy of the head), but every block, the head
included, weighs it 0: it is in no mean and uploads nothing. The engine is `layer_allocation.py`.

    θ_l <- mean over the sampled clients with n_{g(k)} = L, for every layer l
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import register_strategy
from .layer_allocation import LayerAllocation, LayerAllocationConfig

__all__ = ["ExclusiveConfig", "Exclusive"]


@dataclass(kw_only=True)
class ExclusiveConfig(LayerAllocationConfig):
    pass


@register_strategy("exclusive")
class Exclusive(LayerAllocation):
    Config = ExclusiveConfig

    def __init__(self, cfg, *, shapes, population):
        super().__init__(cfg, shapes=shapes, population=population)
        if not (self.budget >= self.num_layers).any():
            raise ValueError(f"strategy.groups.budgets: exclusive needs a group whose budget is every layer "
                             f"({self.num_layers}); none is")

    def layer_mask(self, server, clients, round_index):
        full = self.budget[clients] >= self.num_layers
        return np.repeat(full[:, None], self.num_layers, axis=1)

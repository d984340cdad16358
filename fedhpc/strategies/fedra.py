"""FedRA: every round, each client trains the LoRA of a uniformly random set of its budget's layers.

Paper: Su, Li, Xue, "FedRA: A Random Allocation Strategy for Federated Tuning to Unleash the Power
of Heterogeneous Clients", arXiv 2311.11227 [MEM]; as run by the Fed-HeLLo code (config
`fedra-6_9_12-rnd`). Spec: algorithms.md §2.12.

    client k, round t: S_k ~ choice(L, n_{g(k)}, replace=False), uniformly;  θ_l <- mean over {k: l ∈ S_k}

This is Fed-HeLLo's RGD-HLA with the uniform prior (`fedhello` with `allocation: random`,
`pattern: uniform` draws the same sets: tested); the engine is `layer_allocation.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import register_strategy
from .layer_allocation import LayerAllocation, LayerAllocationConfig

__all__ = ["FedRAConfig", "FedRA"]


@dataclass(kw_only=True)
class FedRAConfig(LayerAllocationConfig):
    pass


@register_strategy("fedra")
class FedRA(LayerAllocation):
    Config = FedRAConfig

    def layer_mask(self, server, clients, round_index):
        return self.draw(np.ones(self.num_layers) / self.num_layers, clients, round_index)

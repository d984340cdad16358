"""Clustered FedIT with given clusters: FedAvg of A, B and head inside each cluster.

With the data's true latent groups (the planted clusters) it is the oracle upper bound for
methods that must discover clusters (HiLoRA, FedTreeLoRA). Spec: algorithms.md §2.11.

    for each cluster g:  θ_g <- Σ_{k∈g} p_k θ_k / Σ_{k∈g} p_k ;  client k starts from θ_{g(k)}

It reduces to FedIT when every client is in one cluster.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Block, Exchange, RoundPlan, Strategy, StrategyConfig, register_strategy


@dataclass(kw_only=True)
class ClusterFedITConfig(StrategyConfig):
    pass


@register_strategy("cluster_fedit")
class ClusterFedIT(Strategy):
    Config = ClusterFedITConfig

    def __init__(self, cfg, *, shapes, population):
        super().__init__(cfg, shapes=shapes, population=population)
        groups = population.groups
        if groups.size == 0 or (groups < 0).any():
            raise ValueError("strategy cluster_fedit needs data with known client groups "
                             "(data.name=planted, or partition.kind=grouped / domain)")
        self.count = int(groups.max()) + 1

    def init_server(self, init, *, frozen):
        return {k: v.expand(self.count, *v.shape[1:]).clone() for k, v in super().init_server(init, frozen=frozen).items()}

    def configure_train(self, server, sampled, seen):
        block = Block(dict(self.shapes), groups=self.population.groups, num_groups=self.count)
        return RoundPlan(sampled, Exchange({"shared": block}, down=dict(self.shapes)))

    def receive(self, server, state, clients, rows=None):
        rows = torch.as_tensor(self.population.groups[clients], dtype=torch.int64)
        return super().receive(server, state, clients, rows)

    def global_model(self, server, init):
        return None

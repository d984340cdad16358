"""Fed-HeLLo: heterogeneous LoRA allocation by Fisher scores, geometric priors or fixed patterns.

Paper: Zhang, Liu, Xu, Hu, "Fed-HeLLo: Efficient Federated Foundation Model Fine-Tuning with
Heterogeneous LoRA Allocation", IEEE TNNLS 2025, arXiv 2506.12213; official code
TNI-playground/Fed_HeLLo. Spec: algorithms.md §5.

Each client trains the LoRA of n_g of the L transformer blocks per round (its resource group's
budget) and each block is averaged over the clients that trained it (`layer_allocation.py`).
Which blocks (`allocation`):

    fixed   GD-HLA: a fixed set per `pattern` (triangle 0..n-1, ...) [reconstructed]
    random  RGD-HLA: S_k ~ choice(L, n_g, replace=False, p = prior(pattern)), sorted, every round
    fim     RGD-HLA, and from round `fim_start` every `fim_every` rounds FIM-HLA: the server scores
            the global model on its proxy set D (1 sample per class + random, held out of training)
                F_θ = (1/|D|) Σ_{(x,y)∈D} (∂ z_y(x) / ∂θ)²   (z_y: true-class logit, or log-probability)
                s_l = Σ_{θ ∈ block l} ‖F_θ‖_F ;  KMeans(3) on s -> p_l ∈ {1/27, 2/27, 1/9}, normalised
            and draws S_k with p in that round (with `persist`, until the next scoring)

With every budget = L (`groups: {fractions: [1], budgets: [L]}`) every client trains every block:
Fed-HeLLo is then FedIT with uniform weights (`weights: num_examples`: FedIT itself), given
`aggregate_head: true` and a non-FIM allocation (FIM holds its proxy samples out of training).
The official code's quirks are options: `sort_clusters: false` (KMeans' label order decides which
cluster gets 1/9), `persist: false` (FIM probabilities only in the FIM round itself), and
`aggregate_head: false` (the default, as there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..rng import Purpose, keyed_rng
from .base import ScoreRequest, register_strategy
from .layer_allocation import (PATTERNS, LayerAllocation, LayerAllocationConfig, deterministic_layers,
                               fim_probabilities, geometric_prior)

__all__ = ["FedHeLLoConfig", "FedHeLLo"]

FIM_PROBS = "fedhello.fim_probs"    # server: [L] float64 layer probabilities of the last FIM round
FIM_SCORES = "fedhello.fim_scores"  # server: [L] float64 per-layer Fisher scores of that round
FIM_ROUND = "fedhello.fim_round"    # server: [1] int64 the last FIM round (0: none yet)


@dataclass(kw_only=True)
class FedHeLLoConfig(LayerAllocationConfig):
    allocation: Literal["fim", "random", "fixed"] = "fim"
    """fim: RGD-HLA with the prior, FIM-HLA in FIM rounds (the paper's method); random: RGD-HLA only;
    fixed: GD-HLA (the pattern's fixed layer sets)."""
    pattern: Literal["bottleneck", "triangle", "inverted_triangle", "uniform"] = "bottleneck"
    """Geometric pattern: the prior of RGD-HLA, or GD-HLA's sets (the official configs use bottleneck)."""
    fim_start: int = 51
    """First FIM round (1-based): the official `t > 49 and t % 50 == 0` (t 0-based) is rounds 51, 101, ..."""
    fim_every: int = 50
    """Rounds between FIM rounds."""
    fim_samples: int = 200
    """Size of the server's proxy set, held out of the clients' training data (1 per class + random)."""
    fim_target: Literal["logit", "log_prob"] = "logit"
    """Differentiated per sample: the true class's raw logit (official) or its log-probability."""
    fim_norm: Literal["frobenius", "trace"] = "frobenius"
    """A block's score: Σ_θ ‖F_θ‖_F over its LoRA tensors (official) or Σ_θ Σ_j F_θj (the trace)."""
    sort_clusters: bool = True
    """Map the KMeans clusters by centroid (low 1/27, high 1/9); false: KMeans' own labels (official)."""
    persist: bool = True
    """Keep the last FIM probabilities until the next FIM round (the paper's schedule); false: use
    them in the FIM round only, the prior elsewhere (official code)."""

    def __post_init__(self):
        if self.fim_start < 1 or self.fim_every < 1:
            raise ValueError(f"strategy.fim_start and strategy.fim_every must be >= 1, "
                             f"got {self.fim_start}, {self.fim_every}")
        if self.allocation == "fim" and self.fim_samples < 1:
            raise ValueError(f"strategy.fim_samples must be >= 1 with allocation=fim, got {self.fim_samples}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"strategy.pattern: unknown '{self.pattern}', known: {', '.join(PATTERNS)}")

    def proxy_samples(self) -> int:
        return self.fim_samples if self.allocation == "fim" else 0


@register_strategy("fedhello")
class FedHeLLo(LayerAllocation):
    Config = FedHeLLoConfig

    def __init__(self, cfg, *, shapes, population):
        super().__init__(cfg, shapes=shapes, population=population)
        self.prior = geometric_prior(cfg.pattern, self.num_layers)

    def init_server(self, init, *, frozen):
        zeros = torch.zeros(self.num_layers, dtype=torch.float64)
        return {**super().init_server(init, frozen=frozen), FIM_PROBS: zeros, FIM_SCORES: zeros.clone(),
                FIM_ROUND: torch.zeros(1, dtype=torch.int64)}

    def is_fim_round(self, round_index: int) -> bool:
        cfg = self.cfg
        return (cfg.allocation == "fim" and round_index >= cfg.fim_start
                and (round_index - cfg.fim_start) % cfg.fim_every == 0)

    def configure_score(self, server, *, round_index):
        if not self.is_fim_round(round_index):
            return None
        lora = [k for keys in self.layer_keys for k in keys]
        return ScoreRequest({k: server[k] for k in self.keys}, lora, target=self.cfg.fim_target,
                            entries=self.cfg.fim_norm == "frobenius")

    def aggregate_score(self, server, scores, *, round_index):
        scores = self.layer_scores(scores)
        kmeans_seed = int(keyed_rng(self.population.seed, round_index, self.population.size,
                                    purpose=Purpose.LAYER_ALLOCATION).integers(2 ** 31))  # the server's own stream
        probs = fim_probabilities(scores.numpy(), sort_clusters=self.cfg.sort_clusters, seed=kmeans_seed)
        return {**server, FIM_SCORES: scores, FIM_PROBS: torch.as_tensor(probs, dtype=torch.float64),
                FIM_ROUND: torch.full((1,), round_index, dtype=torch.int64)}

    def layer_scores(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """`[L]` float64 s_l: per block, Σ over its keys of ‖F_θ‖_F (or of Σ F_θ with `fim_norm: trace`)."""
        reduce = torch.linalg.vector_norm if self.cfg.fim_norm == "frobenius" else torch.sum
        return torch.stack([sum(reduce(scores[k].double()) for k in keys) for keys in self.layer_keys])

    def probabilities(self, server, round_index: int) -> np.ndarray:
        """`[L]` layer probabilities of this round: the last FIM vector where it applies, else the prior."""
        last = int(server[FIM_ROUND][0])
        if self.cfg.allocation == "fim" and last > 0 and (last == round_index or self.cfg.persist):
            return server[FIM_PROBS].numpy()
        return self.prior

    def layer_mask(self, server, clients, round_index):
        if self.cfg.allocation == "fixed":
            mask = np.zeros((len(clients), self.num_layers), dtype=bool)
            for row, c in enumerate(clients):
                mask[row, deterministic_layers(self.cfg.pattern, int(self.budget[c]), self.num_layers, int(c))] = True
            return mask
        return self.draw(self.probabilities(server, round_index), clients, round_index)

    def metrics(self, server):
        if self.cfg.allocation != "fim":
            return {}
        return {"fim_round": int(server[FIM_ROUND][0]), "fim_scores": server[FIM_SCORES].tolist(),
                "fim_probs": server[FIM_PROBS].tolist()}

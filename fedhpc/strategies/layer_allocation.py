"""Layer allocation for resource-heterogeneous clients: the engine shared by Fed-HeLLo, FedRA and
Exclusive (algorithms.md §5.3-5.4 and §2.12; the official Fed_HeLLo code runs all three on one engine).

A client's resource is the number of layers whose LoRA it can train; a "layer" is a transformer
block (all adapted modules of block l, `cohort.group_by_block`). Clients fall into resource groups
with layer budgets n_g; every round each participant trains the LoRA of its own set of n_g layers:

    client k, round t: S_k ⊆ {0..L-1}, |S_k| = n_{g(k)}; every layer's LoRA stays in the forward,
                       only the layers in S_k get gradients and optimizer steps (weight decay too)
    server:            θ_l <- Σ_{k: l ∈ S_k} w_k θ_{k,l} / Σ_{k: l ∈ S_k} w_k   (w_k = 1, or n_k)
                       a layer nobody trained keeps its value; the head is averaged only with
                       `aggregate_head` (the official code never aggregates it: it stays at init)

Each layer is one `Block` whose weight is 0 for the clients that did not train it, so a client
uploads only its trained layers (the modelled bytes follow) and the runtime's per-block means are
exactly the masked per-key averages. The layer sets are a pure function of (seed, round, client,
server state), so configure_train (the block weights) and configure_client (the masks) agree on
every rank. This module also holds the allocation rules the methods pick from: the resource
groups, the geometric priors, GD-HLA's fixed sets, RGD-HLA's draws and FIM-HLA's probabilities.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from ..models.cohort import group_by_block
from ..rng import Purpose, keyed_rng
from .base import (Block, ClientPlan, Exchange, LocalHooks, RoundPlan, Strategy, StrategyConfig, Task, is_head,
                   replace_present)

__all__ = ["GroupsConfig", "LayerAllocationConfig", "LayerAllocation", "resource_groups", "geometric_prior",
           "deterministic_layers", "sample_layers", "fim_probabilities", "PATTERNS", "PRESETS", "FIM_LEVELS"]

ROUND = "layers.round"  # server: rounds aggregated so far, int64 [1] (the round being planned is this + 1)
PATTERNS = ("bottleneck", "triangle", "inverted_triangle", "uniform")
PRESETS = {"1-1-1": [1.0, 1.0, 1.0], "6-3-1": [6.0, 3.0, 1.0]}
"""The paper's resource distributions ("RoC"): shares of the clients in the groups of budgets n_0 < n_1 < n_2."""
OFFICIAL_BOTTLENECK = (3, 3, 3, 2, 2, 1, 1, 1, 2, 3, 3, 3)
"""The official code's bottleneck prior for L = 12, in units of 1/27."""
FIM_LEVELS = (1 / 27, 2 / 27, 1 / 9)
"""FIM-HLA's layer probabilities for the low, middle and high Fisher-score cluster (before normalising)."""


@dataclass(kw_only=True)
class GroupsConfig:
    fractions: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    """Share of the clients in each resource group (normalised); [1, 1, 1] is the paper's RoC 1-1-1."""
    preset: Literal["", "1-1-1", "6-3-1"] = ""
    """A named resource distribution instead of `fractions`: RoC 1-1-1 or 6:3:1 (most clients weakest)."""
    budgets: list[int] = field(default_factory=list)
    """Layers each group trains per round, one per group; empty: ⌈L/2⌉, ⌈3L/4⌉, L for three
    groups (the official 6 / 9 / 12 of L = 12 blocks)."""

    def __post_init__(self):
        if self.preset:  # (a resolved config holds both, equal)
            if [float(f) for f in self.fractions] not in ([1.0, 1.0, 1.0], PRESETS[self.preset]):
                raise ValueError("strategy.groups: give `preset` or `fractions`, not both")
            self.fractions = list(PRESETS[self.preset])
        if not self.fractions or any(f <= 0 for f in self.fractions):
            raise ValueError(f"strategy.groups.fractions must be positive shares, got {self.fractions}")
        if self.budgets and len(self.budgets) != len(self.fractions):
            raise ValueError(f"strategy.groups.budgets needs one budget per group ({len(self.fractions)}), "
                             f"got {self.budgets}")
        if any(b < 1 for b in self.budgets):
            raise ValueError(f"strategy.groups.budgets must be >= 1 layer, got {self.budgets}")

    def resolve_budgets(self, num_layers: int) -> np.ndarray:
        """`[groups]` layer budget of each group for a model of `num_layers` blocks."""
        if not self.budgets:
            if len(self.fractions) != 3:
                raise ValueError(f"strategy.groups.budgets: give one budget per group ({len(self.fractions)} groups)")
            return np.array([math.ceil(num_layers / 2), math.ceil(3 * num_layers / 4), num_layers])
        if max(self.budgets) > num_layers:
            raise ValueError(f"strategy.groups.budgets={self.budgets}: the model has only {num_layers} blocks "
                             "with adapted modules")
        return np.asarray(self.budgets, dtype=np.int64)


def resource_groups(num_clients: int, fractions: list[float], *, seed: int) -> np.ndarray:
    """`[num_clients]` resource group of each client [reconstructed]: group sizes by largest remainder
    of the shares, members by a keyed permutation (the same on every rank, for any rank count)."""
    share = np.asarray(fractions, dtype=np.float64) / sum(fractions)
    counts = np.floor(share * num_clients).astype(np.int64)
    left = num_clients - counts.sum()
    counts[np.argsort(-(share * num_clients - counts), kind="stable")[:left]] += 1
    order = keyed_rng(seed, 0, purpose=Purpose.LAYER_ALLOCATION).permutation(num_clients)
    groups = np.empty(num_clients, dtype=np.int64)
    groups[order] = np.repeat(np.arange(len(share)), counts)
    return groups


def geometric_prior(pattern: str, num_layers: int) -> np.ndarray:
    """`[L]` float64 layer-selection probabilities of a geometric pattern, levels 3 : 2 : 1.

    bottleneck: the official L = 12 vector [3,3,3,2,2,1,1,1,2,3,3,3]/27, resampled (nearest) to L;
    triangle: level 3 - ⌊3l/L⌋ (shallow layers most); inverted_triangle: its mirror; uniform: 1/L.
    Only the L = 12 bottleneck is official; the rest is [reconstructed] (algorithms.md §5.3)."""
    layer = np.arange(num_layers)
    if pattern == "bottleneck":
        level = np.asarray(OFFICIAL_BOTTLENECK, dtype=np.float64)[(2 * layer + 1) * 12 // (2 * num_layers)]
    elif pattern == "triangle":
        level = 3.0 - (3 * layer) // num_layers
    elif pattern == "inverted_triangle":
        level = (3.0 - (3 * layer) // num_layers)[::-1]
    elif pattern == "uniform":
        level = np.ones(num_layers)
    else:
        raise ValueError(f"strategy.pattern: unknown '{pattern}', known: {', '.join(PATTERNS)}")
    return level / level.sum()


def deterministic_layers(pattern: str, budget: int, num_layers: int, client: int) -> np.ndarray:
    """GD-HLA [reconstructed]: the sorted layers a client with `budget` trains under a fixed pattern.

    triangle: 0..n-1; inverted_triangle: L-n..L-1; bottleneck: the first ⌈n/2⌉ and the last ⌊n/2⌋;
    uniform: n evenly spaced layers offset by the client id, so the clients cover every layer alike."""
    n, L = budget, num_layers
    if pattern == "triangle":
        return np.arange(n)
    if pattern == "inverted_triangle":
        return np.arange(L - n, L)
    if pattern == "bottleneck":
        return np.concatenate([np.arange((n + 1) // 2), np.arange(L - n // 2, L)])
    if pattern == "uniform":
        return np.sort((client + (np.arange(n) * L) // n) % L)
    raise ValueError(f"strategy.pattern: unknown '{pattern}', known: {', '.join(PATTERNS)}")


def sample_layers(probs: np.ndarray, budget: int, *, seed: int, round_index: int, client: int) -> np.ndarray:
    """RGD-HLA: `numpy.random.choice(L, budget, replace=False, p=probs)`, sorted, from the client's
    own keyed stream for this round."""
    rng = keyed_rng(seed, round_index, client, purpose=Purpose.LAYER_ALLOCATION)
    return np.sort(rng.choice(len(probs), size=budget, replace=False, p=probs))


def fim_probabilities(scores: np.ndarray, *, sort_clusters: bool = True, seed: int = 0) -> np.ndarray:
    """FIM-HLA: `[L]` probabilities from per-layer Fisher scores: KMeans(3) on the scores, cluster ->
    1/27, 2/27, 1/9, normalised.

    `sort_clusters` maps the clusters by centroid (low -> 1/27, high -> 1/9), the intended behaviour;
    False keeps KMeans' own label order as the official code does (label j -> FIM_LEVELS[j]). With
    fewer than 3 distinct scores there are as many clusters, mapped to the top levels."""
    from sklearn.cluster import KMeans  # imported here: only FIM rounds need it

    values = np.asarray(scores, dtype=np.float64).reshape(-1, 1)
    k = min(3, len(np.unique(values)))
    fit = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(values)
    labels = fit.labels_
    if sort_clusters:
        position = np.empty(k, dtype=np.int64)
        position[np.argsort(fit.cluster_centers_[:, 0], kind="stable")] = np.arange(k)
        labels = position[labels]
    p = np.asarray(FIM_LEVELS)[labels + (3 - k)]
    return p / p.sum()


@dataclass(kw_only=True)
class LayerAllocationConfig(StrategyConfig):
    groups: GroupsConfig = field(default_factory=GroupsConfig)
    """Resource groups: shares of the clients and the layer budget of each."""
    weights: Literal["uniform", "num_examples"] = "uniform"
    """Weights of a layer's mean over the clients that trained it: uniform (the official
    'average_lora_depthfl'), or sample counts (close to its 'weighted_average', by local batches)."""
    aggregate_head: bool = False
    """Average the head over the participants; false (the official code) keeps the server head at its
    initialisation: clients train a copy locally and send nothing."""


class _TrainedLayers(LocalHooks):
    """Only each client's own layers move (gradients and updates, weight decay included)."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = masks

    def movable(self, key):
        return self.masks.get(key)


class LayerAllocation(Strategy):
    """The shared engine: subclasses say which layers each participant trains (`layer_mask`)."""

    Config = LayerAllocationConfig

    def __init__(self, cfg, *, shapes, population):
        super().__init__(cfg, shapes=shapes, population=population)
        modules = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in self.keys if not is_head(k)))
        self.layers = group_by_block(modules)
        """Adapted modules of each layer (transformer block), shallow to deep."""
        block_of = {m: l for l, names in enumerate(self.layers) for m in names}
        self.layer_keys = [[k for k in self.keys if not is_head(k) and block_of[k.rsplit(".", 1)[0]] == l]
                           for l in range(len(self.layers))]
        self.head_keys = [k for k in self.keys if is_head(k)]
        self.num_layers = len(self.layers)
        self.group = resource_groups(population.size, cfg.groups.fractions, seed=population.seed)
        self.budget = cfg.groups.resolve_budgets(self.num_layers)[self.group]
        """`[num_clients]` layers each client trains per round."""

    # --- what a method decides ------------------------------------------------------------------
    def layer_mask(self, server: dict[str, torch.Tensor], clients: np.ndarray, round_index: int) -> np.ndarray:
        """`[C, L]` bool: the layers each of these clients trains in this round."""
        raise NotImplementedError

    # --- the contract -----------------------------------------------------------------------------
    def init_server(self, init, *, frozen):
        return {**super().init_server(init, frozen=frozen), ROUND: torch.zeros(1, dtype=torch.int64)}

    def configure_train(self, server, sampled, seen):
        mask = np.zeros((self.population.size, self.num_layers), dtype=bool)
        mask[sampled] = self.layer_mask(server, sampled, self.round_of(server))
        weight = (np.ones(self.population.size) if self.cfg.weights == "uniform"
                  else self.population.num_examples.astype(np.float64))
        blocks = {f"layer{l}": Block({k: self.shapes[k] for k in keys}, weights=weight * mask[:, l])
                  for l, keys in enumerate(self.layer_keys)}
        if self.cfg.aggregate_head:
            blocks["head"] = Block({k: self.shapes[k] for k in self.head_keys}, weights=weight * mask.any(1))
        return RoundPlan(sampled, Exchange(blocks, down=dict(self.shapes)))

    def configure_client(self, server, state, clients, task):
        if task != Task.TRAIN:
            return super().configure_client(server, state, clients, task)
        mask = torch.as_tensor(self.layer_mask(server, clients, self.round_of(server)))
        movable = {k: mask[:, l].view(-1, *([1] * len(self.shapes[k])))
                   for l, keys in enumerate(self.layer_keys) for k in keys}
        return ClientPlan(self.receive(server, state, clients), list(self.keys), _TrainedLayers(movable))

    def aggregate_train(self, server, reduced, *, round_index):
        new = dict(server)
        for block in reduced.blocks.values():
            new.update(replace_present(server, block))
        new[ROUND] = torch.full((1,), round_index, dtype=torch.int64)
        return new

    # --- helpers ------------------------------------------------------------------------------------
    @staticmethod
    def round_of(server) -> int:
        """The round being planned (rounds aggregated so far + 1)."""
        return int(server[ROUND][0]) + 1

    def draw(self, probs: np.ndarray, clients: np.ndarray, round_index: int) -> np.ndarray:
        """`[C, L]` RGD-HLA masks: each client's budget of layers drawn with `probs` from its own stream."""
        mask = np.zeros((len(clients), self.num_layers), dtype=bool)
        for row, c in enumerate(clients):
            mask[row, sample_layers(probs, int(self.budget[c]), seed=self.population.seed,
                                    round_index=round_index, client=int(c))] = True
        return mask

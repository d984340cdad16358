"""The strategy contract: what a federated LoRA method decides, as pure functions of tensors.

A strategy never calls MPI and never loops over clients in Python where a stacked op will do.
Its verbs follow Flower's Strategy, in the order a round calls them (every rank calls each
with the same arguments, except the client verbs, which see the clients the rank hosts):

  server  init_server        once: the replicated server state
  client  init_client        once: what every client holds before its first round
  server  configure_score    optional, each round before configure_train: a model to score on the
                             server's proxy set (`ScoreRequest`), or None (Fed-HeLLo's FIM-HLA)
  server  aggregate_score    the new server state from those scores
  server  configure_train    each round: who trains, and the declared `Exchange` (blocks up, keys down)
  client  configure_client   each pass of clients: a `ClientPlan` (start adapters, what trains,
                             hooks, optimizer); also for a new client's probe and fine-tuning (`Task`)
  client  finish_client      after local training: the state each client keeps, and its upload
  server  aggregate_train    the new server state from the reduction (`Reduced`, by block name)
  eval    configure_evaluate the adapters each client is evaluated with (seen, or new after its probe)
  eval    global_model       the adapters of the shared model, or None
  log     metrics            method-specific numbers for the round log and summary

State lives in tensors, never in the strategy object (which holds only its config and the
population's fixed facts), so a checkpoint of tensors resumes any method:
- server state: a dict of tensors replicated on every rank (a tier's tensors lead with its
  group count; cluster ids, control variates, stage counters too);
- client state: per client, a dict of `[1, ...]` tensors from `init_client` (kept adapters,
  control variates, projected moments, ...), stored stacked `[clients, ...]` by its rank.
Adapter keys follow peft (`<module>.lora_A`, `<module>.lora_B`) plus `head.weight` / `head.bias`.

The base class is FedIT: everything shared, one mean block, every client in one group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..configtree import Selectable
from ..models.ranks import ClientRanks
from ..runtime.exchange import Block, Exchange, Means, Reduced
from ..train.plan import ClientPlan, LocalHooks, Task

__all__ = ["StrategyConfig", "Strategy", "Population", "RoundPlan", "ScoreRequest", "register_strategy",
           "build_strategy", "list_strategies", "is_lora_a", "is_lora_b", "is_head", "replace_present", "kept_init",
           # the contract's other types, re-exported so a method imports everything from here
           "ClientPlan", "LocalHooks", "Task", "Block", "Exchange", "Reduced"]

STRATEGIES: dict[str, type["Strategy"]] = {}


def is_lora_a(key: str) -> bool:
    return key.endswith(".lora_A")


def is_lora_b(key: str) -> bool:
    return key.endswith(".lora_B")


def is_head(key: str) -> bool:
    return key.startswith("head.")


@dataclass(kw_only=True)
class StrategyConfig(Selectable):
    name: str = "fedit"
    """Federated method (see `fedhpc.strategies.list_strategies()`)."""
    keep_optimizer_state: bool = False
    """Keep each client's optimizer state across rounds (else it restarts every round)."""

    default_name = "fedit"

    @classmethod
    def choices(cls) -> dict[str, type]:
        return {name: strategy.Config for name, strategy in STRATEGIES.items()}

    def adapter_rank(self, r: int) -> int:
        """Rank of the adapters the model is built with, for `lora.r = r` (HiLoRA stacks tiers)."""
        return r

    def proxy_samples(self) -> int:
        """Training samples the server holds out of the clients' data as its proxy set, scored by
        `Strategy.configure_score` (`data/proxy.py`); 0, the default, leaves the data untouched."""
        return 0


@dataclass(frozen=True)
class Population:
    """Fixed facts about every client, indexed by client id."""
    num_examples: np.ndarray
    """`[num_clients]` training samples per client (the default weight of its upload)."""
    groups: np.ndarray
    """`[num_clients]` true latent group (-1: unknown); oracle baselines and diagnostics only."""
    ranks: ClientRanks
    """LoRA rank and scaling per client."""
    seed: int = 0
    """The experiment seed (for a strategy's own keyed random streams, `fedhpc.rng`)."""
    layer_groups: np.ndarray | None = None
    """`[layers, num_clients]` true group of each client at each adapted block, shallow to deep
    (planted data with a depth profile), or None; diagnostics only."""

    @property
    def size(self) -> int:
        return len(self.num_examples)


@dataclass
class RoundPlan:
    """The server's plan for one round."""
    participants: np.ndarray
    """Sorted ids of the clients that train."""
    exchange: Exchange


@dataclass
class ScoreRequest:
    """A model the server scores on its proxy set before a round (`Strategy.configure_score`)."""
    adapters: dict[str, torch.Tensor]
    """`[1, ...]` adapters of the model to score (e.g. the global model)."""
    keys: list[str]
    """Adapter keys to score."""
    target: Literal["logit", "log_prob"] = "logit"
    """What is differentiated per sample: the true class's logit or its log-probability."""
    entries: bool = False
    """True: a score per entry `[*shape]` (the diagonal empirical Fisher); False: their sum `[]`."""


class Strategy:
    """Base of every method: FedIT's behaviour where a method does not say otherwise."""

    Config = StrategyConfig

    def __init__(self, cfg: StrategyConfig, *, shapes: dict[str, tuple[int, ...]], population: Population):
        self.cfg = cfg
        self.shapes = dict(shapes)
        """Per-client shape of every adapter key of the model."""
        self.keys = list(shapes)
        self.population = population
        self.ranks = population.ranks

    # --- state ------------------------------------------------------------------------------
    def init_server(self, init: dict[str, torch.Tensor], *,
                    frozen: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Server state from the shared initial adapters `[1, ...]` and the frozen weights W0
        `[d_out, d_in]` of the adapted modules by name. Called once, before round 1."""
        return {k: init[k].clone() for k in self.keys if k not in self.private()}

    def init_client(self, init: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What every client holds before its first round, `[1, ...]` per key (kept adapters and
        extras); the runtime stores it per client and hands it back to the client verbs."""
        return kept_init(init, self.private())

    # --- the round --------------------------------------------------------------------------
    def configure_score(self, server: dict[str, torch.Tensor], *, round_index: int) -> ScoreRequest | None:
        """Optional, before `configure_train`, identically on every rank: a model to score on the
        server's proxy set (`StrategyConfig.proxy_samples`), or None (the default: no scoring)."""
        return None

    def aggregate_score(self, server: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], *,
                        round_index: int) -> dict[str, torch.Tensor]:
        """The new server state from a `configure_score` request's scores `{key: float64}`: the mean
        over the proxy samples of each sample's squared gradient (`train/scoring.py: proxy_scores`),
        the same on every rank."""
        return server

    def configure_train(self, server: dict[str, torch.Tensor], sampled: np.ndarray, seen: np.ndarray) -> RoundPlan:
        """Who trains this round (`sampled` by the config, from the `seen` clients) and what
        travels: called once per round before local training, identically on every rank."""
        shared = {k: s for k, s in self.shapes.items() if k not in self.private()}
        return RoundPlan(sampled, Exchange({"shared": Block(shared)} if shared else {}, down=shared))

    def configure_client(self, server: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                         clients: np.ndarray, task: Task) -> ClientPlan | None:
        """How these clients train (`state`: their stored state, `[C, ...]`). For `Task.TRAIN`,
        each pass of a round; for a new client, `Task.PROBE` first (None: no probe) and then
        `Task.FINETUNE`, which by default fine-tunes every adapter key from what it was
        evaluated with."""
        if task == Task.PROBE:
            return None
        if task == Task.FINETUNE:
            return ClientPlan(self.configure_evaluate(server, state, clients), list(self.keys))
        return ClientPlan(self.receive(server, state, clients), list(self.keys))

    def finish_client(self, server: dict[str, torch.Tensor], trained: dict[str, torch.Tensor],
                      state: dict[str, torch.Tensor], clients: np.ndarray
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """After a round's local training: (new state, upload). `trained` holds the trained
        adapters, the hooks' `results()` and the optimizer state under `optimizer.<key>`; the
        upload must hold every key of the round's blocks, `[C, ...]`."""
        return {k: trained[k] for k in state if k in trained}, trained

    def aggregate_train(self, server: dict[str, torch.Tensor], reduced: Reduced, *,
                        round_index: int) -> dict[str, torch.Tensor]:
        """The new server state, identically on every rank; by default each mean block's group
        means replace the server tensors of the groups that took part."""
        new = dict(server)
        for block in reduced.blocks.values():
            if isinstance(block, Means):
                new.update(replace_present(server, block))
        return new

    # --- evaluation ---------------------------------------------------------------------------
    def configure_evaluate(self, server: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                           clients: np.ndarray) -> dict[str, torch.Tensor]:
        """Adapters `[C, ...]` each client is evaluated with on its local test split (also a new
        client, zero-shot, with the state its probe left)."""
        return self.receive(server, state, clients)

    def global_model(self, server: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Adapters `[1, ...]` of the global model, evaluated on the shared test set; None when the
        method has none."""
        return {k: (server[k][:1] if k in server else init[k]) for k in self.keys}

    def metrics(self, server: dict[str, torch.Tensor]) -> dict:
        """Method-specific numbers logged each round and in the summary (e.g. clusters found)."""
        return {}

    # --- helpers for subclasses (not part of the contract) ---------------------------------------
    def private(self) -> list[str]:
        """Adapter keys each client keeps to itself (the defaults' split of shared and private)."""
        return []

    def receive(self, server: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                clients: np.ndarray, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Adapters `[C, ...]`: a client's kept tensor where its state has the key, else the server's
        (group `rows[c]` of it, or group 0)."""
        out = {}
        for key in self.keys:
            if key in state:
                out[key] = state[key].clone()
            elif rows is not None:
                out[key] = server[key][rows].clone()
            else:
                out[key] = server[key].expand(len(clients), *server[key].shape[1:]).clone()
        return out

    def summary(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self.cfg).items())
        return f"strategy {self.cfg.name}: {fields}"


def replace_present(server: dict[str, torch.Tensor], block: Means) -> dict[str, torch.Tensor]:
    """The block's group means where a group took part (weight > 0), the server's tensors elsewhere."""
    present = block.weights > 0
    out = {}
    for key, mean in block.values.items():
        keep = present.view(-1, *([1] * (mean.dim() - 1))).to(server[key].device)
        out[key] = torch.where(keep, mean.to(server[key]), server[key])
    return out


def kept_init(init: dict[str, torch.Tensor], keys: list[str]) -> dict[str, torch.Tensor]:
    """The initial adapters of `keys` `[1, ...]`: a client state that keeps them private."""
    return {k: init[k].clone() for k in keys}


def register_strategy(name: str):
    def add(cls):
        if name in STRATEGIES:
            raise ValueError(f"strategy '{name}' registered twice")
        STRATEGIES[name] = cls
        return cls
    return add


def list_strategies() -> list[str]:
    return sorted(STRATEGIES)


def build_strategy(cfg: StrategyConfig, *, shapes: dict[str, tuple[int, ...]], population: Population) -> Strategy:
    if cfg.name not in STRATEGIES:
        raise ValueError(f"unknown strategy '{cfg.name}' (known: {', '.join(list_strategies())})")
    return STRATEGIES[cfg.name](cfg, shapes=shapes, population=population)

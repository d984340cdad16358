"""The strategy contract: what a federated LoRA method decides, as pure functions of tensors.

A strategy never calls MPI and never loops over clients in Python. Per round it
- `broadcast`s: the starting adapters of the cohort's clients `[C, ...]`, from the replicated
  server state and what each client kept from earlier rounds;
- says what trains (`trainable`) and how (`hooks`: extra losses, gradient transforms);
- `contribute`s: tensors `[C, ...]`, a weight and a group id per client (the declared
  reduction: a weighted mean per group, group = root, cluster or client), and optionally
  tensors to be gathered whole in client-id order (concatenation methods: FLoRA, ILoRA);
- `aggregate`s: new server state from the reduced group means and the gathered rows,
  identically on every rank.
What a round moves (`exchange`) may depend on the server state, e.g. on a method's stage.

State lives in tensors, never in the strategy object (which holds only its config), so a
checkpoint of tensors resumes any method:
- server state: a dict of tensors replicated on every rank; a tier's tensors lead with its
  group count (1 for a root-level model); cluster ids, control variates, stage counters too;
- client state: per client, the adapter keys it `keeps()` plus `client_state()` extras
  (e.g. a control variate), stored stacked `[clients, ...]` by the rank hosting the client.
Adapter keys follow peft (`<module>.lora_A`, `<module>.lora_B`) plus `head.weight` / `head.bias`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..configtree import Selectable
from ..models.ranks import ClientRanks
from ..train.local import LocalHooks

__all__ = ["StrategyConfig", "Strategy", "Contribution", "Reduced", "Exchange", "Probe", "register_strategy",
           "build_strategy", "list_strategies", "is_lora_a", "is_lora_b", "is_head"]

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


@dataclass
class Contribution:
    """What a cohort sends up: tensors `[C, ...]`, weights `[C]`, group ids `[C]` in [0, num_groups).

    `tensors` are averaged per group; `gathered` tensors `[C, ...]` reach every rank whole,
    in client-id order (`clients` names the rows).
    """
    tensors: dict[str, torch.Tensor]
    weights: torch.Tensor
    groups: torch.Tensor
    num_groups: int
    gathered: dict[str, torch.Tensor] = field(default_factory=dict)
    clients: np.ndarray | None = None


@dataclass
class Reduced:
    """The declared reduction's result, the same on every rank."""
    means: dict[str, torch.Tensor]
    """`[num_groups, ...]` weighted means; a group nobody contributed to holds zeros."""
    weights: torch.Tensor
    """`[num_groups]` total weight per group (0: group absent this round)."""
    gathered: dict[str, torch.Tensor] = field(default_factory=dict)
    """`[P, ...]` rows of every participant, sorted by client id."""
    gathered_clients: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    """`[P]` client id of each gathered row."""
    gathered_weights: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    """`[P]` weight of each gathered row."""


@dataclass
class Exchange:
    """What one round moves: per-client shapes the reduction averages per group (`means`) and
    gathers whole (`gathered`), and the bytes each participant sends and receives on the
    modelled client-server wire (float32). Bytes left None are counted from the keys the
    strategy sends, each client's tensors at its true rank."""
    means: dict[str, tuple[int, ...]]
    num_groups: int
    gathered: dict[str, tuple[int, ...]] = field(default_factory=dict)
    bytes_up: int | None = None
    bytes_down: int | None = None


@dataclass
class Probe:
    """A short local training a new (unseen) client runs before its first evaluation."""
    adapters: dict[str, torch.Tensor]
    """Starting adapters `[C, ...]`; every key trains (the hooks mask what must not move)."""
    hooks: LocalHooks
    steps: int
    """Local steps of the probe."""


class Strategy:
    """Base of every method: FedIT's behaviour where a method does not say otherwise."""

    Config = StrategyConfig

    def __init__(self, cfg: StrategyConfig, *, keys: list[str], groups: np.ndarray, ranks: ClientRanks | None = None):
        self.cfg = cfg
        self.keys = list(keys)
        self.groups = groups
        """True latent group per client (used by oracle baselines only)."""
        self.ranks = ranks
        """Rank and LoRA scaling per client (None: not given, rank-agnostic methods need none)."""

    def shape_of(self, key: str, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
        """Per-client shape of a key this strategy sends or keeps (`shapes`: the adapters')."""
        return shapes[key]

    def down_rank(self, own: int, participants: np.ndarray) -> int:
        """Rank at which a client of rank `own` receives the LoRA factors, given all participants'
        ranks (stacking methods send more than the client's own rank)."""
        return own

    # --- what clients keep between rounds -------------------------------------------------
    def kept(self) -> list[str]:
        """Adapter keys each client keeps from round to round (its private state)."""
        return [k for k in self.keys if self.keeps(k)]

    def keeps(self, key: str) -> bool:
        return False

    def client_state(self, init: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Extra per-client tensors `[1, ...]` kept between rounds (initial values), beyond kept adapters."""
        return {}

    def update_clients(self, server: dict[str, torch.Tensor], trained: dict[str, torch.Tensor],
                       state: dict[str, torch.Tensor], clients: np.ndarray) -> dict[str, torch.Tensor]:
        """New client state after local training (`state`: kept adapters + extras before it)."""
        return {k: trained[k] for k in self.kept()}

    # --- DOWN ------------------------------------------------------------------------------
    def init_server(self, init: dict[str, torch.Tensor], *,
                    frozen: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Server state from the shared initial adapters `[1, ...]` (and, for methods that need
        them, the frozen weights W0 `[d_out, d_in]` of the adapted modules by name)."""
        return {k: v.clone() for k, v in init.items() if k in self.shared()}

    def shared(self) -> list[str]:
        """Keys the server holds: everything clients do not keep privately."""
        return [k for k in self.keys if not self.keeps(k)]

    def sent_down(self) -> list[str]:
        """Keys transmitted to each participating client (bytes down are counted on these)."""
        return self.shared()

    def broadcast(self, server: dict[str, torch.Tensor], kept: dict[str, torch.Tensor],
                  clients: np.ndarray) -> dict[str, torch.Tensor]:
        """Starting adapters `[C, ...]`: server tensors for shared keys, the client's own for kept keys."""
        count = len(clients)
        out = {}
        for key in self.keys:
            if self.keeps(key):
                out[key] = kept[key].clone()
            else:
                rows = self.server_rows(clients)
                out[key] = server[key][rows].clone() if rows is not None else server[key].expand(count, *server[key].shape[1:]).clone()
        return out

    def server_rows(self, clients: np.ndarray) -> torch.Tensor | None:
        """Which server group each client starts from (None: all from group 0)."""
        return None

    # --- LOCAL -----------------------------------------------------------------------------
    def trainable(self) -> list[str]:
        return list(self.keys)

    def hooks(self, server: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
              clients: np.ndarray) -> LocalHooks:
        """Local-training additions for these clients (`state`: their kept adapters + extras)."""
        return LocalHooks()

    # --- UP --------------------------------------------------------------------------------
    def sent_up(self) -> list[str]:
        """Keys each client uploads and the reduction averages (bytes up are counted on these)."""
        return self.sent_down()

    def gathered_up(self) -> list[str]:
        """Keys each client uploads to be gathered whole (also counted in bytes up)."""
        return []

    def num_groups(self) -> int:
        return 1

    def group_of(self, clients: np.ndarray) -> torch.Tensor:
        return torch.zeros(len(clients), dtype=torch.int64)

    def exchange(self, server: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> Exchange:
        """This round's traffic, from the server state and the model's per-client adapter shapes."""
        return Exchange({k: self.shape_of(k, shapes) for k in self.sent_up()}, self.num_groups(),
                        {k: self.shape_of(k, shapes) for k in self.gathered_up()})

    def participants(self, server: dict[str, torch.Tensor], sampled: np.ndarray, seen: np.ndarray) -> np.ndarray:
        """Who trains this round: the sampled clients, unless a round needs everyone (HiLoRA's clustering)."""
        return sampled

    def contribute(self, trained: dict[str, torch.Tensor], clients: np.ndarray, weights: torch.Tensor, *,
                   server: dict[str, torch.Tensor] | None = None,
                   state: dict[str, torch.Tensor] | None = None) -> Contribution:
        """Tensors to reduce; `server` is this round's server state, `state` the clients' state
        after `update_clients`."""
        return Contribution({k: trained[k] for k in self.sent_up()}, weights, self.group_of(clients), self.num_groups(),
                            gathered={k: trained[k] for k in self.gathered_up()}, clients=clients)

    # --- AGGREGATE -------------------------------------------------------------------------
    def aggregate(self, server: dict[str, torch.Tensor], reduced: Reduced, *, round_index: int) -> dict[str, torch.Tensor]:
        """Weighted means replace the server tensors of every group that took part."""
        present = reduced.weights > 0
        new = dict(server)
        for key, mean in reduced.means.items():
            keep = present.view(-1, *([1] * (mean.dim() - 1)))
            new[key] = torch.where(keep, mean.to(server[key].dtype), server[key])
        return new

    # --- EVALUATE --------------------------------------------------------------------------
    def global_model(self, server: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Adapters `[1, ...]` of the global model; None when the method has none."""
        return {k: (server[k][:1] if k in server else init[k]) for k in self.keys}

    def personalized(self, server: dict[str, torch.Tensor], kept: dict[str, torch.Tensor],
                     clients: np.ndarray) -> dict[str, torch.Tensor]:
        """Adapters `[C, ...]` each client is evaluated with on its local test split."""
        return self.broadcast(server, kept, clients)

    # --- UNSEEN CLIENTS --------------------------------------------------------------------
    def unseen_probe(self, server: dict[str, torch.Tensor], kept: dict[str, torch.Tensor],
                     clients: np.ndarray) -> Probe | None:
        """A probe training new clients run first (None: they start from `unseen_start` directly)."""
        return None

    def unseen_start(self, server: dict[str, torch.Tensor], kept: dict[str, torch.Tensor], clients: np.ndarray,
                     probed: dict[str, torch.Tensor] | None) -> tuple[dict[str, torch.Tensor], LocalHooks]:
        """Adapters `[C, ...]` new clients are evaluated with zero-shot and then fine-tuned from, and the
        fine-tuning hooks; `probed` holds the probe's trained adapters (None without a probe)."""
        return self.broadcast(server, kept, clients), self.hooks(server, kept, clients)

    def metrics(self, server: dict[str, torch.Tensor]) -> dict:
        """Method-specific numbers logged each round and in the summary (e.g. clusters found)."""
        return {}

    def summary(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self.cfg).items())
        return f"strategy {self.cfg.name}: {fields}"


def register_strategy(name: str):
    def add(cls):
        if name in STRATEGIES:
            raise ValueError(f"strategy '{name}' registered twice")
        STRATEGIES[name] = cls
        return cls
    return add


def list_strategies() -> list[str]:
    return sorted(STRATEGIES)


def build_strategy(cfg: StrategyConfig, *, keys: list[str], groups: np.ndarray,
                   ranks: ClientRanks | None = None) -> Strategy:
    if cfg.name not in STRATEGIES:
        raise ValueError(f"unknown strategy '{cfg.name}' (known: {', '.join(list_strategies())})")
    return STRATEGIES[cfg.name](cfg, keys=keys, groups=groups, ranks=ranks)

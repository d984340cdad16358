"""The strategy contract: what a federated LoRA method decides, as pure functions of tensors.

A strategy never calls MPI and never loops over clients in Python. Per round it
- `broadcast`s: the starting adapters of the cohort's clients `[C, ...]`, from the replicated
  server state and what each client kept from earlier rounds;
- says what trains (`trainable`) and how (`hooks`: extra losses, gradient transforms);
- `contribute`s: tensors `[C, ...]`, a weight and a group id per client (the declared
  reduction: a weighted mean per group, group = root, cluster or client);
- `aggregate`s: new server state from the reduced group means, identically on every rank.

Server state is a dict of tensors whose leading dimension is the tier's group count (1 for a
root-level model). Adapter keys follow peft (`<module>.lora_A`, `<module>.lora_B`) plus
`head.weight` / `head.bias`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..configtree import Selectable
from ..train.local import LocalHooks

__all__ = ["StrategyConfig", "Strategy", "Contribution", "Reduced", "register_strategy", "build_strategy",
           "list_strategies", "is_lora_a", "is_lora_b", "is_head"]

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


@dataclass
class Contribution:
    """What a cohort sends up: tensors `[C, ...]`, weights `[C]`, group ids `[C]` in [0, num_groups)."""
    tensors: dict[str, torch.Tensor]
    weights: torch.Tensor
    groups: torch.Tensor
    num_groups: int


@dataclass
class Reduced:
    """The declared reduction's result, the same on every rank: per-group weighted means."""
    means: dict[str, torch.Tensor]
    """`[num_groups, ...]`; a group nobody contributed to holds zeros."""
    weights: torch.Tensor
    """`[num_groups]` total weight per group (0: group absent this round)."""


class Strategy:
    """Base of every method: FedIT's behaviour where a method does not say otherwise."""

    Config = StrategyConfig
    kept_keys: tuple[str, ...] = ()

    def __init__(self, cfg: StrategyConfig, *, keys: list[str], groups: np.ndarray):
        self.cfg = cfg
        self.keys = list(keys)
        self.groups = groups
        """True latent group per client (used by oracle baselines only)."""

    # --- what clients keep between rounds -------------------------------------------------
    def kept(self) -> list[str]:
        """Adapter keys each client keeps from round to round (its private state)."""
        return [k for k in self.keys if self.keeps(k)]

    def keeps(self, key: str) -> bool:
        return False

    # --- DOWN ------------------------------------------------------------------------------
    def init_server(self, init: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Server state from the shared initial adapters `[1, ...]`."""
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

    def hooks(self) -> LocalHooks:
        return LocalHooks()

    # --- UP --------------------------------------------------------------------------------
    def sent_up(self) -> list[str]:
        """Keys each client uploads (bytes up, and what the reduction averages)."""
        return self.sent_down()

    def num_groups(self) -> int:
        return 1

    def group_of(self, clients: np.ndarray) -> torch.Tensor:
        return torch.zeros(len(clients), dtype=torch.int64)

    def contribute(self, trained: dict[str, torch.Tensor], clients: np.ndarray, weights: torch.Tensor) -> Contribution:
        return Contribution({k: trained[k] for k in self.sent_up()}, weights, self.group_of(clients), self.num_groups())

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


def build_strategy(cfg: StrategyConfig, *, keys: list[str], groups: np.ndarray) -> Strategy:
    if cfg.name not in STRATEGIES:
        raise ValueError(f"unknown strategy '{cfg.name}' (known: {', '.join(list_strategies())})")
    return STRATEGIES[cfg.name](cfg, keys=keys, groups=groups)

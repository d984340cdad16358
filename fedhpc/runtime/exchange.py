"""A round's exchange, declared once: what each key block carries up, how it crosses ranks, and
what every client sends and receives on the modelled client-server wire.

A strategy describes a round's traffic as `Block`s (a set of keys that share one grouping and
one weight per client, e.g. one layer's `lora_A` + `lora_B`, or the head) plus what goes down.
Everything else is derived from that one description by the runtime (`runtime/reduce.py`): the
float64 segmented local sums, the bucketed collectives, the MPI bytes, and the modelled bytes
(`modelled_bytes`). The reduction's result (`Reduced`) is keyed by the same block names.

Per-client arrays (`groups`, `weights`, `bytes_up`, ...) are indexed by client id over the whole
population, so the declaration is the same on every rank whatever clients it hosts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from ..models.ranks import numel_at_rank

__all__ = ["Block", "Exchange", "Means", "Rows", "Reduced", "modelled_bytes"]


@dataclass
class Block:
    """One key block's trip up.

    `reduce="mean"`: each group's weighted mean of the block's tensors reaches every rank
    (`Means`); `reduce="gather"`: every contributing client's rows reach every rank whole, in
    client-id order (`Rows`). A client whose weight is 0 did not train the block: it counts in
    no mean, is left out of the gathered rows, and uploads nothing for it.
    """
    keys: dict[str, tuple[int, ...]]
    """Per-client shape of each tensor the block carries (the client's upload holds `[C, *shape]`)."""
    reduce: Literal["mean", "gather"] = "mean"
    groups: np.ndarray | None = None
    """`[num_clients]` group id of each client in [0, num_groups) (None: everyone in group 0)."""
    num_groups: int = 1
    weights: np.ndarray | None = None
    """`[num_clients]` weight of each client's rows (None: its training sample count)."""
    bytes_up: np.ndarray | None = None
    """`[num_clients]` modelled bytes each client uploads for the block (None: its keys in float32,
    each client's LoRA factors at its true rank). A client whose weight is 0 uploads nothing."""

    def __post_init__(self):
        if self.reduce not in ("mean", "gather"):
            raise ValueError(f"Block.reduce must be 'mean' or 'gather', got {self.reduce!r}")
        if self.reduce == "gather" and (self.groups is not None or self.num_groups != 1):
            raise ValueError("a gathered block has no groups: the rows reach every rank whole")

    def weight_of(self, clients: np.ndarray, num_examples: np.ndarray) -> torch.Tensor:
        """`[C]` float64 weights of these clients."""
        source = num_examples if self.weights is None else self.weights
        return torch.as_tensor(np.asarray(source, dtype=np.float64)[clients])

    def group_of(self, clients: np.ndarray) -> torch.Tensor:
        """`[C]` int64 group ids of these clients."""
        if self.groups is None:
            return torch.zeros(len(clients), dtype=torch.int64)
        return torch.as_tensor(np.asarray(self.groups, dtype=np.int64)[clients])


@dataclass
class Exchange:
    """A round's declared traffic: the blocks going up, by name, and what goes down."""
    blocks: dict[str, Block] = field(default_factory=dict)
    down: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Per-client shape of each tensor a participant receives."""
    down_ranks: np.ndarray | None = None
    """`[num_clients]` rank at which LoRA factors travel down (None: the client's own rank;
    stacking methods send more)."""
    bytes_down: np.ndarray | None = None
    """`[num_clients]` modelled bytes each participant receives (None: counted from `down`)."""

    def means(self) -> dict[str, Block]:
        return {name: b for name, b in self.blocks.items() if b.reduce == "mean"}

    def gathers(self) -> dict[str, Block]:
        return {name: b for name, b in self.blocks.items() if b.reduce == "gather"}

    def keys_up(self) -> list[str]:
        """Every key some block carries (what a client's upload must hold)."""
        return [k for b in self.blocks.values() for k in b.keys]


@dataclass
class Means:
    """A mean block's result, the same on every rank."""
    values: dict[str, torch.Tensor]
    """`[num_groups, ...]` float32 weighted means; a group nobody contributed to holds zeros."""
    weights: torch.Tensor
    """`[num_groups]` float64 total weight per group (0: no contribution this round)."""


@dataclass
class Rows:
    """A gathered block's result, the same on every rank."""
    values: dict[str, torch.Tensor]
    """`[P, ...]` float32 rows of every contributing client, sorted by client id."""
    clients: torch.Tensor
    """`[P]` int64 client id of each row."""
    weights: torch.Tensor
    """`[P]` float64 weight of each row."""


@dataclass
class Reduced:
    """The reduction's result by block name."""
    blocks: dict[str, Means | Rows] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Means | Rows:
        return self.blocks[name]


def modelled_bytes(exchange: Exchange, participants: np.ndarray, ranks: np.ndarray,
                   num_examples: np.ndarray) -> tuple[int, int]:
    """Bytes up and down this round on the modelled client-server wire, over all participants."""
    up = 0
    for block in exchange.blocks.values():
        trained = block.weight_of(participants, num_examples).numpy() > 0
        if block.bytes_up is not None:
            up += int(np.asarray(block.bytes_up)[participants][trained].sum())
            continue
        for rank in ranks[participants][trained]:
            up += sum(numel_at_rank(k, s, int(rank)) for k, s in block.keys.items()) * 4
    if exchange.bytes_down is not None:
        return up, int(np.asarray(exchange.bytes_down)[participants].sum())
    down_ranks = ranks if exchange.down_ranks is None else np.asarray(exchange.down_ranks)
    down = sum(sum(numel_at_rank(k, s, int(down_ranks[c])) for k, s in exchange.down.items()) * 4
               for c in participants)
    return up, down

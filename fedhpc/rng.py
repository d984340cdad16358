"""Every random stream of a run, keyed by what it is for: no global RNG state is read or written.

Two kinds of key, both pure functions of the experiment seed and the stream's own ids, so adding
a stream never shifts another's draws and no rank count or pass grouping changes a draw:
- `keyed_rng(*ids, purpose=Purpose.X)`: numpy's generator on `[*ids, X]` for the runtime's streams
  (the ids name what varies: seed, round, client, ...);
- `make_rng(seed, "name", *ids)`: a named stream of the data builders (the name's stable digest).
LoRA dropout masks are counter-based hashes of (seed, round, step, client) (`models/dropout.py`).
"""
from __future__ import annotations

import hashlib
from enum import IntEnum

import numpy as np
import torch

__all__ = ["Purpose", "keyed_rng", "keyed_torch_generator", "make_rng"]


class Purpose(IntEnum):
    """Tags of the runtime's integer-keyed streams (the last word of the key)."""
    DATA_ORDER = 1
    """Each client's batch order in a round: ids (seed, client, round)."""
    SAMPLING = 2
    """The clients sampled for a round: ids (seed, round)."""
    RANK_DRAW = 3
    """Heterogeneous ranks drawn per client (`lora.rank_choices`): ids (seed,)."""
    LORA_REINIT = 4
    """A fresh LoRA A drawn by the server (FLoRA's restart): ids (seed, round, module index)."""
    LAYER_ALLOCATION = 5  # Fed-HeLLo, FedRA: resource groups, ids (seed, 0); layer sets, ids (seed, round, client)
    PROJECTOR_SKETCH = 6
    """FedGaLore's randomized projector: ids (seed, client, round, local step, module index)."""
    AJIVE_RESAMPLE = 7
    """FedGaLore's AJIVE joint-rank bounds drawn by the server: ids (seed, round, module index)."""
    EVAL_SAMPLE = 8
    """The seen clients an intermediate evaluation measures (`eval.fraction` / `eval.count`): ids (seed, round)."""
    CLUSTER_SKETCH = 9
    """The random sketch of the scalable clustering path: ids (seed, matrix index)."""
    FAULTS = 10
    """Client faults (`faults`: dropout, late clients and their share of work): ids (seed, client, round)."""
    TREE_SAMPLE = 11
    """The seen clients FedTreeLoRA builds its tree on when there are more than `tree_clients`: ids (seed,)."""


def keyed_rng(*ids: int, purpose: Purpose) -> np.random.Generator:
    return np.random.default_rng([*(int(i) for i in ids), int(purpose)])


def keyed_torch_generator(*ids: int, purpose: Purpose) -> torch.Generator:
    """A CPU torch generator seeded from the keyed stream."""
    return torch.Generator().manual_seed(int(keyed_rng(*ids, purpose=purpose).integers(2 ** 62)))


def _purpose_words(purpose: str) -> list[int]:
    """A stable integer digest of `purpose` (Python's `hash` is salted per process)."""
    digest = hashlib.blake2b(purpose.encode(), digest_size=8).digest()
    return [int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")]


def make_rng(seed: int, purpose: str, *keys: int) -> np.random.Generator:
    """Generator for one purpose (e.g. "partition", or "planted-client" with a client id)."""
    if seed < 0 or any(k < 0 for k in keys):
        raise ValueError(f"seed and keys must be >= 0, got seed={seed}, keys={keys}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), *_purpose_words(purpose),
                                                         *map(int, keys)]))

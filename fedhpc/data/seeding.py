"""Named random streams: every random choice in the data package draws from its own
generator keyed by (seed, purpose, *keys), never from global state.

Keying by purpose means adding a new random step never shifts the draws of the others,
and keying by client id means a client's data does not depend on how many ranks (or
other clients) there are.
"""
from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["make_rng"]


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

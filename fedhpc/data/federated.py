"""The federated data contract: a pool of samples and which of them each client holds.

Every loader returns a `FederatedData`. Samples stay in one pool per split (no per-client
copies); clients are index arrays into it. Every rank builds the same object from the
same seed, so placement of clients on ranks never changes what a client holds (planted data
with a latent teacher is built per rank instead: only the rank's own clients' samples, the same
bits for each of them; `hosted`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["FederatedData"]


@dataclass
class FederatedData:
    name: str
    num_classes: int
    train_x: torch.Tensor
    """`[N, ...]` model-ready training pool (float images `[N, 3, H, W]` or token ids `[N, T]`)."""
    train_y: torch.Tensor
    """`[N]` int64 labels of the training pool."""
    test_x: torch.Tensor
    """`[M, ...]` pool the clients' local test splits index into."""
    test_y: torch.Tensor
    global_test_x: torch.Tensor
    """`[G, ...]` global test set (the server's view)."""
    global_test_y: torch.Tensor
    client_train: list[np.ndarray] = field(default_factory=list)
    """Per client: indices into the training pool. A user's loader (`data.name: python`) may leave
    it empty: fedhpc then splits the pools by `data.partition` and fills the three fields below."""
    client_test: list[np.ndarray] = field(default_factory=list)
    """Per client: indices into the test pool (its local test split)."""
    groups: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """`[num_clients]` true latent group per client (planted cluster, SC-Dir group, domain);
    -1 where the data has no latent groups."""
    unseen: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """Sorted ids of clients held out of training (evaluated as unseen clients)."""
    domain_names: tuple[str, ...] = ()
    """Names behind the domain ids below (DomainNet); empty where the data has no domains."""
    train_domain: np.ndarray | None = None
    """`[N]` domain id of each training sample, or None."""
    test_domain: np.ndarray | None = None
    """`[M]` domain id of each test-pool sample, or None."""
    global_test_domain: np.ndarray | None = None
    """`[G]` domain id of each global test sample (for per-domain accuracy), or None."""
    layer_groups: np.ndarray | None = None
    """`[layers, num_clients]` true group of each client at each adapted block, shallow to deep
    (planted data with a depth profile, `data.planted.depth_profile`), or None."""

    hosted: np.ndarray | None = None
    """Sorted ids of the clients whose samples the pools hold (planted data built per rank:
    `load_planted(hosted=...)`); None: every client's. Another client's index arrays have their
    true length but point past the pools' end."""

    @property
    def num_clients(self) -> int:
        return len(self.client_train)

    @property
    def num_examples(self) -> np.ndarray:
        """`[num_clients]` training-sample counts (aggregation weights)."""
        return np.array([len(ix) for ix in self.client_train], dtype=np.int64)

    @property
    def seen(self) -> np.ndarray:
        """Sorted ids of clients that take part in training."""
        return np.setdiff1d(np.arange(self.num_clients), self.unseen)

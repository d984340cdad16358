"""A server-held proxy set carved out of the clients' training data (Fed-HeLLo's FIM set, §5.3).

Only a strategy that asks for one (`StrategyConfig.proxy_samples() > 0`) changes the data: every
other run keeps its clients' samples bit for bit. The proxy set is one sample of every class
found among the seen clients' training samples, then samples drawn uniformly from the rest (the
official code: 1 per CIFAR-100 class + 100 random = 200), all from one keyed stream, so every
rank carves the same set; the chosen samples leave their clients' training indices.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..rng import make_rng
from .federated import FederatedData

__all__ = ["hold_out_proxy"]


def hold_out_proxy(data: FederatedData, *, count: int, seed: int) -> tuple[FederatedData, np.ndarray]:
    """`data` without the proxy samples, and the proxy set: sorted indices into the training pool."""
    pool = np.concatenate([data.client_train[c] for c in data.seen])
    if count > len(pool) - len(data.seen):
        raise ValueError(f"a server proxy set of {count} samples needs more than the seen clients' {len(pool)} "
                         "training samples; lower the strategy's proxy-set size (e.g. strategy.fim_samples)")
    rng = make_rng(seed, "server-proxy")
    labels = data.train_y[pool].numpy()
    per_class = [rng.choice(pool[labels == c]) for c in np.unique(labels)][:count]
    rest = np.setdiff1d(pool, per_class)
    proxy = np.sort(np.concatenate([np.asarray(per_class, dtype=np.int64),
                                    rng.choice(rest, size=count - len(per_class), replace=False)]))
    client_train = [ix[~np.isin(ix, proxy)] for ix in data.client_train]
    empty = [int(c) for c in data.seen if len(client_train[c]) == 0]
    if empty:
        raise ValueError(f"a server proxy set of {count} samples leaves client {empty[0]} no training sample; "
                         "lower the strategy's proxy-set size (e.g. strategy.fim_samples)")
    return replace(data, client_train=client_train), proxy

"""Labelled image pools -> FederatedData: the path shared by digits, CIFAR-100, DomainNet.

A loader reads its data set into `ImagePools` (source resolution, already capped by
`cap_indices`). `federate_pools` splits the training pool over clients (partition.py),
gives each client a local test split that matches its training mix, picks the unseen
clients, then resizes and normalises the images (images.py). The global test set is the whole test
pool: the server evaluates on all of it, as in ILoRA's code.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .config import DataConfig
from .federated import FederatedData
from .images import channel_stats, normalise_, resize_images
from .partition import choose_unseen, ensure_min_samples, matched_test_partition, partition_clients
from ..rng import make_rng

__all__ = ["ImagePools", "cap_indices", "federate_pools", "federate_tensors", "split_clients"]


@dataclass(kw_only=True)
class ImagePools:
    name: str
    num_classes: int
    train_images: np.ndarray
    """`[N, C, h, w]` training pool at source resolution (uint8 or float; C is 1 or 3)."""
    train_labels: np.ndarray
    """`[N]` int labels."""
    test_images: np.ndarray
    """`[M, C, h, w]` test pool."""
    test_labels: np.ndarray
    domain_names: tuple[str, ...] = ()
    """Names of the domain ids (empty: no domains)."""
    train_domain: np.ndarray | None = None
    """`[N]` domain id per training sample, or None."""
    test_domain: np.ndarray | None = None
    """`[M]` domain id per test sample, or None."""


def cap_indices(num_train: int, num_test: int, *, max_samples: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices kept from each pool: a seeded subsample of `max_samples` training
    samples (0: keep all), and of the test pool shrunk by the same factor so that a quick
    run also evaluates quickly. Loaders call it before reading images where they can."""
    if max_samples == 0 or max_samples >= num_train:
        return np.arange(num_train), np.arange(num_test)
    keep_test = max(1, round(num_test * max_samples / num_train))
    return (np.sort(rng.choice(num_train, size=max_samples, replace=False)),
            np.sort(rng.choice(num_test, size=keep_test, replace=False)))


def split_clients(train_y: np.ndarray, test_y: np.ndarray, cfg: DataConfig, *, num_clients: int, seed: int,
                  num_classes: int, train_domain: np.ndarray | None = None,
                  test_domain: np.ndarray | None = None):
    """Who holds what, for any labelled pair of pools: `(client_train, client_test, groups, unseen)`.

    The training pool is split by `cfg.partition` (every partitioner), each client gets a local
    test split matching its training mix (per (domain, class) under a domain split), and the
    unseen clients are chosen; each step draws from its own keyed stream."""
    client_train, groups = partition_clients(train_y, cfg.partition, num_clients=num_clients,
                                             rng=make_rng(seed, "partition"), domains=train_domain)
    # Under a domain split a client's test mix is per (domain, class); otherwise per class.
    if cfg.partition.kind == "domain":
        if test_domain is None:
            raise ValueError("partition.kind='domain' needs the domain of every test sample too")
        train_keys = train_domain * num_classes + train_y
        test_keys = test_domain * num_classes + test_y
    else:
        train_keys, test_keys = train_y, test_y
    test_rng = make_rng(seed, "local-test")
    client_test = matched_test_partition(train_keys, client_train, test_keys, rng=test_rng)
    if len(test_y) >= num_clients:
        client_test = ensure_min_samples(client_test, min_samples=1, rng=test_rng,
                                         groups=groups if (groups >= 0).all() else None)
    unseen = choose_unseen(num_clients, fraction=cfg.unseen_fraction, rng=make_rng(seed, "unseen"))
    return client_train, client_test, groups, unseen


def federate_pools(pools: ImagePools, cfg: DataConfig, *, num_clients: int,
                   seed: int) -> FederatedData:
    train_y = pools.train_labels.astype(np.int64)
    test_y = pools.test_labels.astype(np.int64)
    client_train, client_test, groups, unseen = split_clients(
        train_y, test_y, cfg, num_clients=num_clients, seed=seed, num_classes=pools.num_classes,
        train_domain=pools.train_domain, test_domain=pools.test_domain)

    train_x = resize_images(pools.train_images, image_size=cfg.image_size)
    test_x = resize_images(pools.test_images, image_size=cfg.image_size)
    mean, std = channel_stats(train_x)
    normalise_(train_x, mean, std)
    normalise_(test_x, mean, std)
    test_y_t = torch.from_numpy(test_y)
    return FederatedData(
        name=pools.name, num_classes=pools.num_classes,
        train_x=train_x, train_y=torch.from_numpy(train_y),
        test_x=test_x, test_y=test_y_t, global_test_x=test_x, global_test_y=test_y_t,
        client_train=client_train, client_test=client_test, groups=groups, unseen=unseen,
        domain_names=pools.domain_names, train_domain=pools.train_domain,
        test_domain=pools.test_domain, global_test_domain=pools.test_domain,
    )


def federate_tensors(data: FederatedData, cfg: DataConfig, *, num_clients: int, seed: int) -> FederatedData:
    """`data` with its pools kept as they are (model-ready tensors: token ids, images) and its
    clients split by `cfg.partition` (`split_clients`): the path of text sources and of a
    user's loader that leaves `client_train` empty."""
    client_train, client_test, groups, unseen = split_clients(
        data.train_y.numpy(), data.test_y.numpy(), cfg, num_clients=num_clients, seed=seed,
        num_classes=data.num_classes, train_domain=data.train_domain, test_domain=data.test_domain)
    return replace(data, client_train=client_train, client_test=client_test, groups=groups, unseen=unseen)

"""Partitioners: which samples of a labelled pool each client holds.

Pure functions on label arrays. Each returns one sorted index array per client and takes
its random generator as an argument, so the same labels and seed give the same split on
every rank. The kinds (algorithms.md §1.4 and §3.8):

- `iid`: uniform random split; sizes differ by at most one.
- `dirichlet` (GL-Dir): for each class q ~ Dir(alpha 1_N), q = max(q, 1e-3), renormalised,
  n_c q rounded to counts (ILoRA's official code). ILoRA floors the counts and gives the
  remainder to the last client; with many clients that hands it about N/2 extra samples per
  class (a tenth of CIFAR-100 at 100 clients), so the remainder goes by largest fraction.
- `pathological` (Patho(n)): each client holds exactly n classes (least-used classes first,
  random tie-break); a class's samples are split over its holders by Dirichlet(1)
  quantities (Fed-HeLLo's ClassWisePartitioner, from FeDepth).
- `grouped` (SC-Dir) [reconstructed]: clients fall into latent groups, each owning a
  disjoint random subset of the classes; inside a group every class is split over the
  group's clients as in `dirichlet`.
- `domain`: clients split evenly over domains, then `dirichlet` or `iid` inside a domain.

Small clients: a client left with fewer than `min_samples` takes random samples from the
largest client of its own group, so a group keeps its classes and a domain its images.
`pathological` never needs this: every (class, client) share gets a floor, so each
client keeps exactly n classes.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import numpy as np

from .config import PartitionConfig

__all__ = [
    "iid_partition", "dirichlet_partition", "pathological_partition", "grouped_partition",
    "domain_partition", "ensure_min_samples", "balanced_groups", "partition_clients",
    "matched_test_partition", "choose_unseen",
]

Parts = list[np.ndarray]
CLIENT_SHARE_FLOOR = 1e-3
"""ILoRA's floor on a client's Dirichlet share of a class (before renormalising)."""


def balanced_groups(num_clients: int, num_groups: int, rng: np.random.Generator) -> np.ndarray:
    """`[num_clients]` group per client: k mod G after a seeded permutation, so groups
    differ in size by at most one and are not blocks of neighbouring client ids."""
    groups = np.empty(num_clients, dtype=np.int64)
    groups[rng.permutation(num_clients)] = np.arange(num_clients) % num_groups
    return groups


def _shuffled_by_value(values: np.ndarray, num_values: int, rng: np.random.Generator) -> Parts:
    """Per value v in [0, num_values): the indices holding v, in random order."""
    order = np.argsort(values, kind="stable")
    bounds = np.searchsorted(values[order], np.arange(num_values + 1))
    return [rng.permutation(order[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _largest_remainder(quotas: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to `total`, each the floor or ceiling of its quota."""
    counts = np.floor(quotas).astype(np.int64)
    counts[np.argsort(counts - quotas, kind="stable")[:total - counts.sum()]] += 1
    return counts


def _ilora_counts(n: int, shares: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    q = np.maximum(rng.dirichlet(np.full(shares, alpha)), CLIENT_SHARE_FLOOR)
    return _largest_remainder(q / q.sum() * n, n)


def _quantity_counts(n: int, shares: int, rng: np.random.Generator) -> np.ndarray:
    """Fed-HeLLo's Dirichlet(1) quantities; the rounding residual goes to random shares."""
    counts = np.floor(rng.dirichlet(np.ones(shares)) * n).astype(np.int64)
    np.add.at(counts, rng.choice(shares, size=n - counts.sum()), 1)
    return counts


def _deal_classes(labels: np.ndarray, holders: list[np.ndarray], *, num_clients: int,
                  split_counts: Callable[[int, int, int], np.ndarray],
                  rng: np.random.Generator) -> Parts:
    """Cut each class's shuffled samples into `split_counts(class, n, len(holders))` pieces,
    one per client holding the class."""
    parts: list[list[np.ndarray]] = [[np.empty(0, dtype=np.int64)] for _ in range(num_clients)]
    for c, idx in enumerate(_shuffled_by_value(labels, len(holders), rng)):
        if len(holders[c]) == 0:
            continue
        counts = split_counts(c, len(idx), len(holders[c]))
        for k, chunk in zip(holders[c], np.split(idx, np.cumsum(counts)[:-1])):
            parts[k].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def _present_classes(labels: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.bincount(labels))


def iid_partition(num_samples: int, *, num_clients: int, rng: np.random.Generator) -> Parts:
    return [np.sort(p) for p in np.array_split(rng.permutation(num_samples), num_clients)]


def dirichlet_partition(labels: np.ndarray, *, num_clients: int, alpha: float,
                        rng: np.random.Generator) -> Parts:
    everyone = np.arange(num_clients)
    holders = [everyone] * (int(labels.max()) + 1)
    return _deal_classes(labels, holders, num_clients=num_clients, rng=rng,
                         split_counts=lambda c, n, shares: _ilora_counts(n, shares, alpha, rng))


def pathological_partition(labels: np.ndarray, *, num_clients: int, classes_per_client: int,
                           min_samples: int, rng: np.random.Generator) -> Parts:
    present = _present_classes(labels)
    if classes_per_client > len(present):
        raise ValueError(f"partition.classes_per_client={classes_per_client} exceeds the "
                         f"{len(present)} classes in the data")
    if num_clients * classes_per_client < len(present):
        raise ValueError(f"{num_clients} clients x classes_per_client={classes_per_client} cannot "
                         f"hold all {len(present)} classes; raise num_clients or classes_per_client")
    usage = np.zeros(len(present), dtype=np.int64)
    holders: list[list[int]] = [[] for _ in range(int(labels.max()) + 1)]
    for k in range(num_clients):
        pick = np.lexsort((rng.random(len(present)), usage))[:classes_per_client]
        usage[pick] += 1
        for c in present[pick]:
            holders[c].append(k)
    share_floor = max(1, math.ceil(min_samples / classes_per_client))

    def split_counts(c: int, n: int, shares: int) -> np.ndarray:
        if n < shares * share_floor:
            raise ValueError(f"class {c} has {n} samples, too few for its {shares} clients to get "
                             f"{share_floor} each; lower num_clients, classes_per_client or min_samples")
        return share_floor + _quantity_counts(n - shares * share_floor, shares, rng)

    return _deal_classes(labels, [np.array(h, dtype=np.int64) for h in holders],
                         num_clients=num_clients, split_counts=split_counts, rng=rng)


def grouped_partition(labels: np.ndarray, *, num_clients: int, num_groups: int, alpha: float,
                      rng: np.random.Generator) -> tuple[Parts, np.ndarray]:
    """SC-Dir: returns the parts and `[num_clients]` group ids."""
    present = _present_classes(labels)
    if num_groups > len(present):
        raise ValueError(f"partition.num_groups={num_groups} exceeds the {len(present)} classes "
                         f"in the data (each group owns its own classes)")
    if num_groups > num_clients:
        raise ValueError(f"partition.num_groups={num_groups} exceeds num_clients={num_clients}")
    groups = balanced_groups(num_clients, num_groups, rng)
    class_group = np.full(int(labels.max()) + 1, -1)
    class_group[rng.permutation(present)] = np.arange(len(present)) % num_groups
    holders = [np.flatnonzero(groups == g) for g in class_group]
    parts = _deal_classes(labels, holders, num_clients=num_clients, rng=rng,
                          split_counts=lambda c, n, shares: _ilora_counts(n, shares, alpha, rng))
    return parts, groups


def domain_partition(domains: np.ndarray, labels: np.ndarray, *, num_clients: int,
                     within: Literal["dirichlet", "iid"], alpha: float,
                     rng: np.random.Generator) -> tuple[Parts, np.ndarray]:
    """Clients split evenly over domains; returns the parts and each client's domain."""
    num_domains = int(domains.max()) + 1
    if num_clients < num_domains:
        raise ValueError(f"partition.kind='domain' needs at least one client per domain: "
                         f"num_clients={num_clients} < {num_domains} domains")
    groups = balanced_groups(num_clients, num_domains, rng)
    parts: Parts = [np.empty(0, dtype=np.int64)] * num_clients
    for d in range(num_domains):
        members, idx = np.flatnonzero(groups == d), np.flatnonzero(domains == d)
        if within == "iid":
            local = iid_partition(len(idx), num_clients=len(members), rng=rng)
        else:
            local = dirichlet_partition(labels[idx], num_clients=len(members), alpha=alpha, rng=rng)
        for k, part in zip(members, local):
            parts[k] = idx[part]
    return parts, groups


def ensure_min_samples(parts: Parts, *, min_samples: int, rng: np.random.Generator,
                       groups: np.ndarray | None = None) -> Parts:
    """Top up every client below `min_samples` with random samples of the largest client in
    its group (`groups=None`: one group); disjointness and cover are kept."""
    parts = list(parts)
    sizes = np.array([len(p) for p in parts])
    groups = np.zeros(len(parts), dtype=np.int64) if groups is None else groups
    for k in np.flatnonzero(sizes < min_samples):
        peers = np.flatnonzero(groups == groups[k])
        while sizes[k] < min_samples:
            donor = peers[np.argmax(sizes[peers])]
            spare = sizes[donor] - min_samples
            if spare <= 0:
                where = "" if len(peers) == len(parts) else f" of group {groups[k]}"
                raise ValueError(f"{sizes[peers].sum()} samples cannot give the {len(peers)} clients"
                                 f"{where} {min_samples} each; lower num_clients")
            moved = np.zeros(sizes[donor], dtype=bool)
            moved[rng.choice(sizes[donor], size=min(min_samples - sizes[k], spare), replace=False)] = True
            parts[k] = np.sort(np.concatenate([parts[k], parts[donor][moved]]))
            parts[donor] = parts[donor][~moved]
            sizes[k], sizes[donor] = len(parts[k]), len(parts[donor])
    return parts


def partition_clients(labels: np.ndarray, cfg: PartitionConfig, *, num_clients: int,
                      rng: np.random.Generator,
                      domains: np.ndarray | None = None) -> tuple[Parts, np.ndarray]:
    """Split a labelled pool over clients as `cfg.kind` says. Returns the parts and
    `[num_clients]` latent groups (SC-Dir group, domain; -1 for kinds without groups)."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if len(labels) < num_clients * cfg.min_samples:
        raise ValueError(f"{num_clients} clients x partition.min_samples={cfg.min_samples} need "
                         f"{num_clients * cfg.min_samples} training samples, the pool has "
                         f"{len(labels)}; lower num_clients or raise data.max_samples")
    groups = np.full(num_clients, -1, dtype=np.int64)
    if cfg.kind == "iid":
        parts = iid_partition(len(labels), num_clients=num_clients, rng=rng)
    elif cfg.kind == "dirichlet":
        parts = dirichlet_partition(labels, num_clients=num_clients, alpha=cfg.alpha, rng=rng)
    elif cfg.kind == "pathological":
        parts = pathological_partition(labels, num_clients=num_clients, rng=rng,
                                       classes_per_client=cfg.classes_per_client,
                                       min_samples=cfg.min_samples)
    elif cfg.kind == "grouped":
        parts, groups = grouped_partition(labels, num_clients=num_clients, num_groups=cfg.num_groups,
                                          alpha=cfg.alpha, rng=rng)
    elif cfg.kind == "domain":
        if domains is None:
            raise ValueError("partition.kind='domain' needs a data set with domains (domainnet; data.domains for folder, "
                             "data.columns.domain for hf, train_domain for python)")
        parts, groups = domain_partition(domains, labels, num_clients=num_clients,
                                         within=cfg.within_domain, alpha=cfg.alpha, rng=rng)
    else:
        raise ValueError(f"unknown partition.kind {cfg.kind!r}")
    parts = ensure_min_samples(parts, min_samples=cfg.min_samples, rng=rng,
                               groups=groups if (groups >= 0).all() else None)
    return parts, groups


def matched_test_partition(train_keys: np.ndarray, client_train: Parts, test_keys: np.ndarray,
                           *, rng: np.random.Generator) -> Parts:
    """Local test splits that follow each client's training mix.

    The test samples of each stratum (a class, or a (domain, class) pair) go to the clients
    holding that stratum in training, in proportion to how many they hold (largest-remainder
    rounding). ILoRA's code draws a second, independent Dirichlet split of the test set
    instead; matching proportions keeps a client's test distribution equal to its training
    distribution, which is what personalised accuracy is meant to measure. Test samples of
    strata no client trains on are left out of every local split (they stay in the global
    test set).
    """
    num_keys = int(max(train_keys.max(), test_keys.max())) + 1
    held = np.stack([np.bincount(train_keys[ix], minlength=num_keys) for ix in client_train])
    parts: list[list[np.ndarray]] = [[np.empty(0, dtype=np.int64)] for _ in client_train]
    for s, idx in enumerate(_shuffled_by_value(test_keys, num_keys, rng)):
        weights = held[:, s]
        if weights.sum() == 0 or len(idx) == 0:
            continue
        counts = _largest_remainder(weights * len(idx) / weights.sum(), len(idx))
        for k, chunk in zip(range(len(parts)), np.split(idx, np.cumsum(counts)[:-1])):
            parts[k].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def choose_unseen(num_clients: int, *, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted ids of the `round(fraction * num_clients)` clients held out of training."""
    count = int(math.floor(fraction * num_clients + 0.5))
    if count >= num_clients:
        raise ValueError(f"data.unseen_fraction={fraction} holds out all {num_clients} clients; "
                         f"lower it or add clients")
    return np.sort(rng.choice(num_clients, size=count, replace=False))

"""scikit-learn's bundled digits (1,797 8x8 grey images, 10 classes): a real data set that
needs no download, for tests and laptop runs.

The images are split into a training and a test pool by `test_fraction` (seeded), then
upsampled to `image_size` and repeated over three channels.
"""
from __future__ import annotations

import numpy as np

from .config import DataConfig
from .federated import FederatedData
from .pooled import ImagePools, cap_indices, federate_pools
from ..rng import make_rng

__all__ = ["load_digits"]


def load_digits(cfg: DataConfig, *, num_clients: int, seed: int) -> FederatedData:
    from sklearn.datasets import load_digits as sklearn_digits  # lazy: sklearn is slow to import

    bunch = sklearn_digits()
    images = bunch.images[:, None].astype(np.float32)
    labels = bunch.target.astype(np.int64)
    order = make_rng(seed, "digits-split").permutation(len(labels))
    num_test = round(cfg.test_fraction * len(labels))
    train, test = np.sort(order[num_test:]), np.sort(order[:num_test])
    keep_train, keep_test = cap_indices(len(train), len(test), max_samples=cfg.max_samples,
                                        rng=make_rng(seed, "cap"))
    train, test = train[keep_train], test[keep_test]
    pools = ImagePools(name="digits", num_classes=10,
                       train_images=images[train], train_labels=labels[train],
                       test_images=images[test], test_labels=labels[test])
    return federate_pools(pools, cfg, num_clients=num_clients, seed=seed)

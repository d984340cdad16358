"""CIFAR-100 from torchvision's on-disk format (`cifar-100-python/` with the `train` and
`test` pickles: b'data' uint8 `[N, 3072]`, b'fine_labels'). Nothing is downloaded.

Memory: pools are float32 tensors, 12 KiB per image at 32x32 but 588 KiB at 224x224
(29 GiB for the training set); at large `image_size` cap the pool with `max_samples`.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .config import DataConfig
from .federated import FederatedData
from .pooled import ImagePools, cap_indices, federate_pools
from ..rng import make_rng

__all__ = ["load_cifar100", "find_cifar100"]

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


def find_cifar100(root: str) -> Path:
    """The folder holding the `train` and `test` pickles: `root` itself or
    `root/cifar-100-python`."""
    how = (f"download {CIFAR100_URL} and extract it under data.root, or run "
           f"torchvision.datasets.CIFAR100(root, download=True) on a machine with internet")
    if not root:
        raise FileNotFoundError(f"data.root is empty: set it to the folder holding "
                                f"cifar-100-python/ ({how})")
    for folder in (Path(root), Path(root) / "cifar-100-python"):
        if (folder / "train").is_file() and (folder / "test").is_file():
            return folder
    raise FileNotFoundError(f"CIFAR-100 not found: expected {Path(root) / 'cifar-100-python' / 'train'}"
                            f" and .../test; {how}")


def _read_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """`[N, 3, 32, 32]` uint8 images and `[N]` fine labels of one pickle."""
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    try:
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"fine_labels"], dtype=np.int64)
    except KeyError as missing:
        raise ValueError(f"{path} is not a CIFAR-100 pickle: no key {missing}") from None
    return images, labels


def load_cifar100(cfg: DataConfig, *, num_clients: int, seed: int) -> FederatedData:
    folder = find_cifar100(cfg.root)
    train_images, train_labels = _read_split(folder / "train")
    test_images, test_labels = _read_split(folder / "test")
    keep_train, keep_test = cap_indices(len(train_labels), len(test_labels),
                                        max_samples=cfg.max_samples, rng=make_rng(seed, "cap"))
    pools = ImagePools(name="cifar100", num_classes=100,
                       train_images=train_images[keep_train], train_labels=train_labels[keep_train],
                       test_images=test_images[keep_test], test_labels=test_labels[keep_test])
    return federate_pools(pools, cfg, num_clients=num_clients, seed=seed)

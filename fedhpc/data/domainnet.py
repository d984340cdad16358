"""DomainNet (six visual domains, 345 classes) from a local folder; nothing is downloaded.

Expected layout under `data.root` (the official release, http://ai.bu.edu/M3SDA/):
`<domain>/<class>/<image>.jpg` and the split lists `<domain>_train.txt`,
`<domain>_test.txt`, one `relative/path.jpg label` per line, paths relative to the root.
Images are read with PIL, converted to RGB and resized to `image_size` x `image_size`
(aspect ratio not kept, as in the usual `Resize((S, S))`). `num_classes` is the largest
label in the loaded lists plus one (345 for the full release). `max_samples` subsamples
the lists before any image is read.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .config import DataConfig
from .federated import FederatedData
from .pooled import ImagePools, cap_indices, federate_pools
from ..rng import make_rng

__all__ = ["load_domainnet", "DOMAINNET_DOMAINS"]

DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
DOMAINNET_URL = "http://ai.bu.edu/M3SDA/"


def _read_list(path: Path) -> tuple[list[str], list[int]]:
    if not path.is_file():
        raise FileNotFoundError(f"DomainNet split list not found: {path}; download the domain's "
                                f"images and split lists from {DOMAINNET_URL} into {path.parent}")
    paths, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2 or not fields[1].isdigit():
            raise ValueError(f"{path}:{number}: expected 'relative/path.jpg label', got {line!r}")
        paths.append(fields[0])
        labels.append(int(fields[1]))
    return paths, labels


def _read_split(root: Path, domains: list[str], split: str):
    """Relative paths, labels and domain ids of one split over the chosen domains."""
    paths, labels, domain_ids = [], [], []
    for d, domain in enumerate(domains):
        p, y = _read_list(root / f"{domain}_{split}.txt")
        paths += p
        labels += y
        domain_ids += [d] * len(p)
    return paths, np.array(labels, dtype=np.int64), np.array(domain_ids, dtype=np.int64)


def _read_image(path: Path, image_size: int) -> np.ndarray:
    with Image.open(path) as image:
        rgb = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def _read_images(root: Path, paths: list[str], image_size: int) -> np.ndarray:
    """`[N, 3, S, S]` uint8; decoding runs in threads (PIL releases the GIL), in order."""
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        images = list(pool.map(lambda p: _read_image(root / p, image_size), paths))
    return np.stack(images) if images else np.empty((0, 3, image_size, image_size), np.uint8)


def load_domainnet(cfg: DataConfig, *, num_clients: int, seed: int) -> FederatedData:
    root = Path(cfg.root)
    if not cfg.root or not root.is_dir():
        raise FileNotFoundError(f"DomainNet folder not found: data.root={cfg.root!r}; download the "
                                f"domains and their split lists from {DOMAINNET_URL} and point "
                                f"data.root at the folder holding <domain>_train.txt")
    domains = list(cfg.domains) or list(DOMAINNET_DOMAINS)
    unknown = sorted(set(domains) - set(DOMAINNET_DOMAINS))
    if unknown:
        raise ValueError(f"data.domains: unknown DomainNet domains {unknown}; "
                         f"choose from {', '.join(DOMAINNET_DOMAINS)}")
    train_paths, train_labels, train_domain = _read_split(root, domains, "train")
    test_paths, test_labels, test_domain = _read_split(root, domains, "test")
    if len(train_labels) == 0 or len(test_labels) == 0:
        raise ValueError(f"DomainNet split lists under {root} list no images for {domains}")
    keep_train, keep_test = cap_indices(len(train_labels), len(test_labels),
                                        max_samples=cfg.max_samples, rng=make_rng(seed, "cap"))
    pools = ImagePools(
        name="domainnet",
        num_classes=int(max(train_labels.max(), test_labels.max())) + 1,
        train_images=_read_images(root, [train_paths[i] for i in keep_train], cfg.image_size),
        train_labels=train_labels[keep_train],
        test_images=_read_images(root, [test_paths[i] for i in keep_test], cfg.image_size),
        test_labels=test_labels[keep_test],
        domain_names=tuple(domains),
        train_domain=train_domain[keep_train],
        test_domain=test_domain[keep_test],
    )
    return federate_pools(pools, cfg, num_clients=num_clients, seed=seed)

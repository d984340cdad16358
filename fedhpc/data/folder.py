"""`data.name: folder`: an image folder tree, as torchvision's `ImageFolder` reads it.

    <root>/<class>/<image>                      one pool: a seeded `test_fraction` is held out
    <root>/train/<class>/<image> + <root>/test/<class>/<image>     given training and test pools
    <root>/[train|test/]<domain>/<class>/<image>                   with `data.domains` listed

Classes are the sorted names of the class folders holding at least one image (the union over the
pools), so label ids follow ImageFolder's. Images (`IMAGE_SUFFIXES`) are decoded with PIL,
converted to RGB and resized to `data.image_size`; `data.max_samples` subsamples the file lists
before any image is read. Every partitioner applies; `domain` needs `data.domains`.
"""
from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .config import DataConfig
from .federated import FederatedData
from .pooled import ImagePools, cap_indices, federate_pools
from ..rng import make_rng

__all__ = ["load_folder", "decode_image", "decode_images", "carve_test", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""File suffixes read as images (torchvision's IMG_EXTENSIONS), any case."""


def decode_image(value, *, image_size: int, base: Path | None = None) -> np.ndarray:
    """`[3, S, S]` uint8 from a PIL image, encoded bytes, a `{"bytes", "path"}` record (how
    `datasets` stores an Image feature) or a file path (relative to `base`)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, os.PathLike)):
        path = Path(value) if base is None or Path(value).is_absolute() else base / value
        image = Image.open(path)
    elif isinstance(value, Image.Image):
        image = value
    else:
        raise ValueError(f"cannot read an image from a {type(value).__name__}")
    with image:
        rgb = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def decode_images(values, *, image_size: int, base: Path | None = None) -> np.ndarray:
    """`[N, 3, S, S]` uint8, in order; decoding runs in threads (PIL releases the GIL)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        images = list(pool.map(lambda v: decode_image(v, image_size=image_size, base=base), values))
    return np.stack(images) if images else np.empty((0, 3, image_size, image_size), np.uint8)


def carve_test(num_samples: int, *, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices of one pool: a seeded `test_fraction` goes to the test pool."""
    order = make_rng(seed, "source-split").permutation(num_samples)
    num_test = min(max(1, round(test_fraction * num_samples)), num_samples - 1)
    return np.sort(order[num_test:]), np.sort(order[:num_test])


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _scan(folder: Path, domains: list[str]) -> list[tuple[str, str, int]]:
    """(file, class name, domain id) of every image under `folder`, in sorted order."""
    found = []
    for d, sub in enumerate(domains or [""]):
        top = folder / sub
        if not top.is_dir():
            raise FileNotFoundError(f"data.domains: no folder {top} (expected <root>/<domain>/<class>/<image>)")
        for class_dir in sorted(p for p in top.iterdir() if p.is_dir()):
            files = sorted(f for f in class_dir.rglob("*") if _is_image(f))
            found += [(str(f), class_dir.name, d) for f in files]
    return found


def load_folder(cfg: DataConfig, *, num_clients: int, seed: int, modality: str = "image", **_) -> FederatedData:
    root = Path(cfg.root)
    layout = "<root>/<class>/<image> (or <root>/train/<class>/... and <root>/test/<class>/...)"
    if not cfg.root:
        raise FileNotFoundError(f"data.root is empty: set it to an image folder laid out as {layout}")
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: image folder '{root}' does not exist (expected {layout})")
    if modality != "image":
        raise ValueError("data.name=folder holds images; it needs an image model (model.family=timm)")
    split = (root / "train").is_dir() and (root / "test").is_dir()
    train = _scan(root / "train" if split else root, list(cfg.domains))
    test = _scan(root / "test", list(cfg.domains)) if split else []
    if not train:
        raise ValueError(f"data.root: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}; expected {layout}")
    if split and not test:
        raise ValueError(f"data.root: {root / 'test'} holds no images; fill it or remove it to carve a test pool")
    classes = sorted({c for _, c, _ in train + test})
    if not split:
        keep_train, keep_test = carve_test(len(train), test_fraction=cfg.test_fraction, seed=seed)
        train, test = [train[i] for i in keep_train], [train[i] for i in keep_test]
    keep_train, keep_test = cap_indices(len(train), len(test), max_samples=cfg.max_samples, rng=make_rng(seed, "cap"))
    train, test = [train[i] for i in keep_train], [test[i] for i in keep_test]
    index = {c: i for i, c in enumerate(classes)}

    def labels(items):
        return np.array([index[c] for _, c, _ in items], dtype=np.int64)

    def domain_ids(items):
        return np.array([d for _, _, d in items], dtype=np.int64) if cfg.domains else None

    pools = ImagePools(
        name="folder", num_classes=len(classes),
        train_images=decode_images([f for f, _, _ in train], image_size=cfg.image_size), train_labels=labels(train),
        test_images=decode_images([f for f, _, _ in test], image_size=cfg.image_size), test_labels=labels(test),
        domain_names=tuple(cfg.domains), train_domain=domain_ids(train), test_domain=domain_ids(test))
    return federate_pools(pools, cfg, num_clients=num_clients, seed=seed)

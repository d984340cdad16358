"""Federated data: data sets, partitioners and the `FederatedData` every loader returns.

`build_federated_data(cfg, num_clients=..., seed=...)` looks the data set up by name in
`DATASETS`. Same inputs give bitwise the same `FederatedData` on every process, whatever its
thread count: all randomness comes from numpy generators keyed by (seed, purpose), never global
state, and the build runs single-threaded.
"""
from __future__ import annotations

from typing import Callable, Literal

from ..single_thread import single_threaded
from .cifar100 import load_cifar100
from .config import ColumnsConfig, DataConfig, PartitionConfig, PlantedConfig
from .custom import check_federated_data, load_python
from .digits import load_digits
from .domainnet import load_domainnet
from .federated import FederatedData
from .folder import load_folder
from .hf import load_hf, special_frame
from .planted import TOKEN_OFFSET, TextShape, load_planted

__all__ = ["build_federated_data", "list_datasets", "DATASETS", "TEXT_DATASETS", "DataConfig",
           "PartitionConfig", "PlantedConfig", "ColumnsConfig", "FederatedData", "TOKEN_OFFSET",
           "check_federated_data", "SOURCES"]

DATASETS: dict[str, Callable[..., FederatedData]] = {
    "planted": load_planted,
    "digits": load_digits,
    "cifar100": load_cifar100,
    "domainnet": load_domainnet,
    "hf": load_hf,
    "folder": load_folder,
    "python": load_python,
}
"""Name -> loader `(cfg, *, num_clients, seed) -> FederatedData`."""
TEXT_DATASETS = ("planted",)
"""Data sets that can also be rendered as token ids (their loaders take `text=`)."""
SOURCES = ("hf", "folder", "python")
"""Your own data (their loaders take `modality=`, `seq_len=` and the model's `tokenizer=`)."""


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def build_federated_data(cfg: DataConfig, *, num_clients: int, seed: int,
                         modality: Literal["image", "text"] = "image", seq_len: int = 32,
                         vocab_size: int = 1000, tokenizer: str = "",
                         hosted: np.ndarray | None = None) -> FederatedData:
    """Load `cfg.name` and split it over `num_clients` clients.

    Args:
        cfg: which data set and how it is split.
        num_clients: clients to create (unseen ones included).
        seed: keys every random choice; same seed, same data on every rank.
        modality: `image` gives float32 `[N, 3, S, S]` images; `text` gives int64 token ids
            `[N, seq_len]` in [TOKEN_OFFSET, TOKEN_OFFSET + vocab_size) (planted only).
        seq_len: tokens per text sample.
        vocab_size: distinct token ids a text sample may use.
        tokenizer: the Hugging Face model (`model.name`) whose tokenizer turns text into token ids
            (`hf` text columns); planted text wears its special tokens (`TextShape.frame`).
        hosted: planted data only: build only these clients' samples (a rank's own clients; the
            same bits per client as the full build, see `load_planted`). None: every client's.
    """
    if cfg.name not in DATASETS:
        raise ValueError(f"unknown data set {cfg.name!r}; known: {', '.join(list_datasets())}")
    with single_threaded():  # the same bits whatever the thread count (fedhpc/single_thread.py)
        if hosted is not None:
            if cfg.name != "planted":
                raise ValueError(f"hosted: only planted data is built per rank, not {cfg.name!r}")
            text = _text_shape(seq_len, vocab_size, tokenizer) if modality == "text" else None
            return load_planted(cfg, num_clients=num_clients, seed=seed, text=text, hosted=hosted)
        return _build(cfg, num_clients=num_clients, seed=seed, modality=modality, seq_len=seq_len,
                      vocab_size=vocab_size, tokenizer=tokenizer)


def _build(cfg: DataConfig, *, num_clients: int, seed: int, modality: str, seq_len: int,
           vocab_size: int, tokenizer: str = "") -> FederatedData:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if cfg.name in SOURCES:
        if modality not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
        return DATASETS[cfg.name](cfg, num_clients=num_clients, seed=seed, modality=modality, seq_len=seq_len,
                                  tokenizer=tokenizer)
    if modality == "image":
        return DATASETS[cfg.name](cfg, num_clients=num_clients, seed=seed)
    if modality != "text":
        raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
    if cfg.name not in TEXT_DATASETS:
        raise ValueError(f"data set {cfg.name!r} has images only; text modality needs one of "
                         f"{', '.join(TEXT_DATASETS)}")
    return DATASETS[cfg.name](cfg, num_clients=num_clients, seed=seed,
                              text=_text_shape(seq_len, vocab_size, tokenizer))


def _text_shape(seq_len: int, vocab_size: int, tokenizer: str) -> TextShape:
    """Planted text framed by the model's own special tokens when its tokenizer is known."""
    return TextShape(seq_len=seq_len, vocab_size=vocab_size, frame=special_frame(tokenizer) if tokenizer else None)

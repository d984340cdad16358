"""The experiment config: one typed tree, loaded from YAML plus dotted command-line overrides.

    fedhpc run configs/quickstart.yaml strategy.name=ffa_lora data.partition.alpha=0.1

Each section is a keyword-only dataclass owned by the package it configures; this module
only composes them and loads files. Errors name the dotted key (see `configtree`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from . import strategies  # noqa: F401  (registers the strategy configs)
from .configtree import ConfigError, apply_overrides, build, to_dict
from .data.config import DataConfig
from .io.checkpoint import CheckpointConfig
from .models.config import LoraConfig, ModelConfig
from .runtime.faults import FaultsConfig
from .store import StoreConfig
from .strategies.base import StrategyConfig
from .train.local import TrainConfig

__all__ = ["ExperimentConfig", "SamplingConfig", "EvalConfig", "load_config", "ConfigError", "to_dict"]


@dataclass(kw_only=True)
class SamplingConfig:
    fraction: float = 1.0
    """Fraction of the training clients that take part in each round."""
    count: int = 0
    """If > 0: exactly this many clients per round (overrides fraction)."""

    def __post_init__(self):
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")


@dataclass(kw_only=True)
class EvalConfig:
    every: int = 1
    """Evaluate every this many rounds (the last round is always evaluated)."""
    unseen_finetune_epochs: int = 1
    """Local epochs an unseen client trains from the global model before its second evaluation."""
    unseen_finetune_lr_scale: float = 1.0
    """Learning rate of that fine-tuning as a multiple of `train.optimizer.lr`, for every method (a
    method's own scale, e.g. HiLoRA's `leaf_lr_scale`, applies on top). Tuned by `fedhpc sweep`."""
    fraction: float = 1.0
    """Fraction of the seen clients whose personalized accuracy an intermediate evaluation measures:
    a sample seeded by (seed, round), like Flower's fraction_evaluate (1: every client)."""
    count: int = 0
    """If > 0: exactly this many clients per intermediate evaluation (overrides fraction)."""
    final: Literal["all", "sample"] = "all"
    """The last round evaluates every seen client (all) or the same kind of sample (sample)."""

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.count < 0:
            raise ValueError(f"count must be >= 0 (0: use fraction), got {self.count}")
        if self.final not in ("all", "sample"):
            raise ValueError(f"final must be all or sample, got {self.final!r}")
        if not self.unseen_finetune_lr_scale > 0:
            raise ValueError(f"unseen_finetune_lr_scale must be > 0, got {self.unseen_finetune_lr_scale}")
        if self.unseen_finetune_epochs < 0:
            raise ValueError(f"unseen_finetune_epochs must be >= 0, got {self.unseen_finetune_epochs}")


@dataclass(kw_only=True)
class ExperimentConfig:
    name: str = "quickstart"
    """Run name: outputs go to `<out_dir>/<name>/`."""
    out_dir: str = "runs"
    """Folder holding run directories."""
    seed: int = 0
    """Seed of everything: backbone init, data, sampling, each client's streams."""
    rounds: int = 5
    """Federated rounds."""
    num_clients: int = 32
    """Simulated clients (including held-out unseen ones)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: this rank's local GPU when present, else CPU."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=lambda: build(StrategyConfig, {}))
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    """Client faults injected on purpose: dropout, stragglers, diverging clients (runtime/faults.py)."""

    def __post_init__(self):
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {self.num_clients}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.model.family == "timm":
            size = self.model.kwargs.setdefault("img_size", self.data.image_size)
            if size != self.data.image_size:
                raise ValueError(f"model.kwargs.img_size ({size}) must equal data.image_size ({self.data.image_size})")
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a plain folder name, got {self.name!r}")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML file (or start from defaults), apply `a.b=value` overrides, validate."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return build(ExperimentConfig, apply_overrides(data, list(overrides)))

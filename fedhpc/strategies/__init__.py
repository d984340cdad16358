"""Federated LoRA methods, one module each, registered by name."""
from . import cluster_fedit, fedit, fedsa_lora, ffa_lora, hilora, local  # noqa: F401  (registration)
from .base import (Contribution, Reduced, Strategy, StrategyConfig, build_strategy, list_strategies,
                   register_strategy)

__all__ = ["Contribution", "Reduced", "Strategy", "StrategyConfig", "build_strategy", "list_strategies",
           "register_strategy"]

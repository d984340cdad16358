"""Local-LoRA: every client trains its own adapters and head; nothing is communicated.

The lower bound of federation: what a client reaches on its own data alone. It has no
global model, so its global accuracy is reported as null.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Strategy, StrategyConfig, register_strategy


@dataclass(kw_only=True)
class LocalConfig(StrategyConfig):
    pass


@register_strategy("local")
class Local(Strategy):
    Config = LocalConfig

    def private(self) -> list[str]:
        return list(self.keys)

    def global_model(self, server, init):
        return None

"""What a strategy tells local training: the client plan (start, what trains, hooks, optimizer).

A `ClientPlan` is the client half of the strategy contract: `Strategy.configure_client` returns
one for a pass of clients, and the runtime runs `local_train` from it. `LocalHooks` are the
plan's additions to the plain loop (extra losses, gradient transforms, masks); the optimizer
is the plan's too, so a method may keep moments in its own layout (projected coordinates).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Protocol

import torch

from .optim import OptimConfig

__all__ = ["Task", "LocalHooks", "Optimizer", "ClientPlan"]


class Task(Enum):
    """Why clients train: a federated round, a new client's probe, or its fine-tuning."""
    TRAIN = "train"
    PROBE = "probe"
    FINETUNE = "finetune"


class LocalHooks:
    """What a strategy adds to local training; the defaults add nothing."""

    lr_scale: float = 1.0
    """Multiplies the configured learning rate (e.g. a stage that fine-tunes gently)."""

    def loss(self, adapters: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Extra per-client loss `[C]` (e.g. a proximal or orthogonality term)."""
        return None

    def movable(self, key: str) -> torch.Tensor | None:
        """Bool mask, broadcastable to trainable `key`, of the entries training may move: their
        gradients (before clipping) and the optimizer's update, weight decay included, are masked
        to it. None: every entry."""
        return None

    def grads(self, grads: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor]) -> None:
        """Transform the gradients in place before the optimizer step (e.g. control variates)."""

    def probes(self, step: int) -> dict[str, torch.Tensor]:
        """Extra tensors `[C, ...]` bound beside the adapters for local step `step` only, whose
        gradients the hooks want but no optimizer steps (e.g. a zero `<module>.client_delta`: its
        gradient is the full-space gradient of the weight, for GaLore's projector). Default: none."""
        return {}

    def probed(self, grads: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor]) -> None:
        """The gradients of this step's `probes` (raw: before masks and clipping), called before
        `grads`; `adapters` may be changed in place (e.g. a new projector in a fixed factor)."""

    def stepped(self, active: torch.Tensor) -> None:
        """Called after each optimizer step with the clients `[C]` (bool) that took it."""

    def results(self) -> dict[str, torch.Tensor]:
        """Per-client tensors `[C, ...]` measured during training (e.g. a mean gradient), handed to
        the strategy's `finish_client` with the trained adapters."""
        return {}


class Optimizer(Protocol):
    """An optimizer over stacked client tensors (`train.optim.StackedOptimizer` is one). Its state
    is a dict of `[C, ...]` tensors of any layout, with `step` `[C]` the per-client step count."""

    def init_state(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
             active: torch.Tensor | None = None, lr_scale: float = 1.0,
             movable: dict[str, torch.Tensor] | None = None) -> None: ...


@dataclass
class ClientPlan:
    """How a pass of clients trains locally."""
    start: dict[str, torch.Tensor]
    """Starting adapters `[C, ...]` (trained in place), plus any shared frozen extras
    (`<module>.base_delta`) the cohort forward reads."""
    trainable: list[str]
    """Keys that get gradients and optimizer steps."""
    hooks: LocalHooks = field(default_factory=LocalHooks)
    optimizer: Optimizer | Callable[[OptimConfig], Optimizer] | None = None
    """None: the config's AdamW / SGD (`train.optimizer`). A function instead of an optimizer is
    called with the run's `train.optimizer` settings (a method's own optimizer that follows the
    configured lr, betas, eps and weight decay)."""
    opt_state: dict[str, torch.Tensor] | None = None
    """Starting optimizer state `[C, ...]`; None: the kept state (`strategy.keep_optimizer_state`)
    or a fresh one."""
    steps: int = 0
    """> 0: exactly this many local steps (a probe); 0: the config's epochs / steps."""

"""Optimizers over stacked client tensors: one fused update for a whole cohort.

Every tensor is `[C, ...]`, one slice per client. The update is elementwise, so one call is
C independent optimizers; what differs per client is kept per client: the step count (bias
correction) and whether the client takes this step at all (`active`, for clients whose
local data ran out before their cohort's longest client).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["OptimConfig", "StackedOptimizer", "clip_per_client"]


@dataclass(kw_only=True)
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    """Local optimizer."""
    lr: float = 1e-3
    """Learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) or L2 added to the gradient (SGD)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW moment decay rates."""
    eps: float = 1e-8
    """AdamW denominator floor."""
    momentum: float = 0.0
    """SGD momentum."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.weight_decay < 0 or self.eps <= 0:
            raise ValueError(f"weight_decay must be >= 0 and eps > 0, got {self.weight_decay}, {self.eps}")


def clip_per_client(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale each client's gradient (all its tensors together) to norm <= max_norm; returns norms [C]."""
    sq = sum(g.flatten(1).pow(2).sum(1) for g in grads)
    norms = sq.sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))
    return norms


class StackedOptimizer:
    """AdamW or SGD over a dict of stacked tensors, with per-client step counts.

    `state` is a plain dict of tensors keyed like the parameters (`<key>.exp_avg`, ...) plus
    `step` `[C]`, so callers can gather and scatter it per client with the adapters.
    """

    def __init__(self, cfg: OptimConfig):
        self.cfg = cfg

    def state_keys(self, keys: list[str]) -> list[str]:
        if self.cfg.name == "adamw":
            return [f"{k}.{s}" for k in keys for s in ("exp_avg", "exp_avg_sq")]
        return [f"{k}.momentum" for k in keys] if self.cfg.momentum > 0 else []

    def init_state(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        count = next(iter(params.values())).shape[0]
        device = next(iter(params.values())).device
        state = {"step": torch.zeros(count, dtype=torch.int64, device=device)}
        for key in self.state_keys(list(params)):
            state[key] = torch.zeros_like(params[key.rsplit(".", 1)[0]])
        return state

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
             state: dict[str, torch.Tensor], active: torch.Tensor | None = None, lr_scale: float = 1.0,
             movable: dict[str, torch.Tensor] | None = None) -> None:
        """One update of every active client, in place, at learning rate `lr_scale` x cfg.lr.
        `movable[key]` (bool, broadcastable) limits the update, weight decay included, to its entries.

        Multi-tensor: each elementwise op runs once over the list of every key (`torch._foreach_*`)
        rather than once per key; every element sees the same ops in the same order as a per-key
        loop, so the numbers are the same bit for bit (tests/test_fused.py)."""
        cfg = self.cfg
        lr = cfg.lr * lr_scale
        count = state["step"].shape[0]
        act = torch.ones(count, dtype=torch.bool, device=state["step"].device) if active is None else active
        state["step"] += act.to(torch.int64)
        everyone = bool(act.all())
        keys = list(grads)
        if not keys:
            return
        p, g = [params[k] for k in keys], [grads[k] for k in keys]
        shapes = [(count,) + (1,) * (t.dim() - 1) for t in p]
        if cfg.name == "adamw":
            t = state["step"].clamp(min=1).to(torch.float64)
            bc1 = 1 - cfg.betas[0] ** t
            bc2_sqrt = (1 - cfg.betas[1] ** t).sqrt()
            step_size = (lr / bc1).to(torch.float32)
            m = [state[f"{k}.exp_avg"] for k in keys]
            v = [state[f"{k}.exp_avg_sq"] for k in keys]
            new_m = torch._foreach_lerp(m, g, 1 - cfg.betas[0])
            new_v = torch._foreach_add(torch._foreach_mul(v, cfg.betas[1]),
                                       torch._foreach_mul(torch._foreach_mul(g, g), 1 - cfg.betas[1]))
            denom = torch._foreach_div(torch._foreach_sqrt(new_v),
                                       [bc2_sqrt.to(x.dtype).view(s) for x, s in zip(v, shapes)])
            torch._foreach_add_(denom, cfg.eps)
            update = torch._foreach_div(new_m, denom)
            torch._foreach_mul_(update, [step_size.view(s) for s in shapes])
            if cfg.weight_decay:
                update = torch._foreach_add(update, torch._foreach_mul(p, lr * cfg.weight_decay))
            _assign_all(m, new_m, act, shapes, everyone)
            _assign_all(v, new_v, act, shapes, everyone)
        else:
            update = torch._foreach_add(g, torch._foreach_mul(p, cfg.weight_decay)) if cfg.weight_decay else g
            if cfg.momentum > 0:
                buf = [state[f"{k}.momentum"] for k in keys]
                new_buf = torch._foreach_add(torch._foreach_mul(buf, cfg.momentum), update)
                _assign_all(buf, new_buf, act, shapes, everyone)
                update = new_buf
            update = torch._foreach_mul(update, lr)
        if movable:
            update = [u * movable[k] if k in movable else u for k, u in zip(keys, update)]
        if everyone:
            torch._foreach_sub_(p, update)
        else:
            _assign_all(p, torch._foreach_sub(p, update), act, shapes, everyone)


def _assign_all(dst: list[torch.Tensor], src: list[torch.Tensor], act: torch.Tensor, shapes: list[tuple],
                everyone: bool) -> None:
    """dst[i] <- src[i] for the active clients (all of them: one multi-tensor copy)."""
    if everyone:
        torch._foreach_copy_(dst, src)
    else:
        for d, s, shape in zip(dst, src, shapes):
            _assign(d, s, act.view(shape))


def _assign(dst: torch.Tensor, src: torch.Tensor, mask: torch.Tensor | None) -> None:
    if mask is None:
        dst.copy_(src)
    else:
        dst.copy_(torch.where(mask, src, dst))

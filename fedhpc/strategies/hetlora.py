"""HetLoRA: zero-padding aggregation weighted by update norm, and rank self-pruning.

Paper: Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models", EMNLP 2024, arXiv 2401.06432. Spec: algorithms.md §2.7.

    client k: B_k = B[:, :r_k], A_k = A[:r_k]  (r_k: its rank, possibly pruned below its budget)
    local loss: CE + λ ‖B_k[:, t:r_k] A_k[t:r_k]‖_F  with t = ⌊γ r_k⌋ (all modules together)
    after training: if that tail norm fell below its value at the start, r_k <- max(1, ⌊γ r_k⌋)
    server: w_k = ‖S_k‖_F / Σ_j ‖S_j‖_F ,  S_k = (B_k A_k of every module, stacked)
            B <- Σ_k w_k pad(B_k) ,  A <- Σ_k w_k pad(A_k)   (zero-padded to r_max)
    head <- Σ_k p_k head_k

The norm over all modules' stacked products follows the RHLA code. A pruned rank is the
client's state (`hetlora.rank`); bytes are still counted at the client's configured rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.ranks import mask_to_ranks
from .base import LocalHooks, StrategyConfig, register_strategy
from .factors import FactorStrategy, padded_mean

__all__ = ["HetLoRAConfig", "HetLoRA"]

RANK = "hetlora.rank"  # client state: current (pruned) rank, as float [1]


@dataclass(kw_only=True)
class HetLoRAConfig(StrategyConfig):
    prune: bool = True
    """Rank self-pruning (and its tail penalty)."""
    prune_gamma: float = 0.9
    """Decay factor γ: the tail is ranks ⌊γ r⌋..r−1, pruning keeps ⌊γ r⌋."""
    prune_lambda: float = 1e-3
    """Weight λ of the tail-norm penalty in the local loss."""

    def __post_init__(self):
        if not 0.0 < self.prune_gamma < 1.0 or self.prune_lambda < 0:
            raise ValueError("prune_gamma must lie in (0, 1) and prune_lambda be >= 0")


class _TailPenalty(LocalHooks):
    def __init__(self, strategy: "HetLoRA", ranks: torch.Tensor):
        self.strategy, self.ranks = strategy, ranks

    def loss(self, adapters, start):
        return self.strategy.cfg.prune_lambda * self.strategy.tail_norm(adapters, self.ranks)


@register_strategy("hetlora")
class HetLoRA(FactorStrategy):
    Config = HetLoRAConfig

    def init_client(self, init):
        return {RANK: torch.full((1, 1), float(self.ranks.max))}

    def current_ranks(self, state, clients) -> torch.Tensor:
        """`[C]` rank each client trains at: its budget, or lower once pruned."""
        pruned = state[RANK].view(-1).to("cpu", torch.int64)
        return torch.minimum(self.ranks.of(clients), pruned)

    def receive(self, server, state, clients, rows=None):
        return mask_to_ranks(super().receive(server, state, clients, rows), self.current_ranks(state, clients))

    def tail_norm(self, adapters, ranks: torch.Tensor) -> torch.Tensor:
        """`[C]` ‖B[:, t:r] A[t:r]‖_F over all modules, t = ⌊γ r⌋, via r×r Gram matrices."""
        ranks = ranks.to(adapters[self.keys[0]].device)
        r_max = adapters[f"{self.modules[0]}.lora_A"].shape[1]
        idx = torch.arange(r_max, device=ranks.device)
        start = torch.floor(ranks.double() * self.cfg.prune_gamma).to(torch.int64)
        tail = ((idx >= start.view(-1, 1)) & (idx < ranks.view(-1, 1))).to(adapters[self.keys[0]].dtype)
        pair = tail.unsqueeze(2) * tail.unsqueeze(1)                                       # [C, r, r]
        total = 0.0
        for m in self.modules:
            b, a = adapters[f"{m}.lora_B"], adapters[f"{m}.lora_A"]
            total = total + ((b.mT @ b) * pair * (a @ a.mT)).sum((1, 2))                  # tr(D BᵀB D AAᵀ)
        return (total + 1e-12).sqrt()

    def configure_client(self, server, state, clients, task):
        plan = super().configure_client(server, state, clients, task)
        if plan is not None and self.cfg.prune and self.cfg.prune_lambda > 0:
            plan.hooks = _TailPenalty(self, self.current_ranks(state, clients))
        return plan

    def finish_client(self, server, trained, state, clients):
        ranks = self.current_ranks(state, clients)
        if not self.cfg.prune:
            return {RANK: state[RANK]}, trained
        before = self.tail_norm(self.receive(server, state, clients), ranks)
        after = self.tail_norm(trained, ranks)
        shrunk = torch.floor(ranks.double() * self.cfg.prune_gamma).clamp(min=1).to(torch.int64)
        new = torch.where(after.cpu() < before.cpu(), shrunk, ranks)
        return {RANK: new.to(state[RANK].dtype).view(-1, 1).to(state[RANK].device)}, trained

    def aggregate_train(self, server, reduced, *, round_index):
        new = super().aggregate_train(server, reduced, round_index=round_index)  # the head's mean
        parts = {m: self.gathered_factors(reduced, m) for m in self.modules}
        norms = sum((p.B @ p.A).square().sum((1, 2)) for p in parts.values()).sqrt()
        weights = norms / norms.sum() if norms.sum() > 0 else next(iter(parts.values())).p
        for m, part in parts.items():
            new[f"{m}.lora_B"] = self.store(padded_mean(part.B, weights), server[f"{m}.lora_B"])
            new[f"{m}.lora_A"] = self.store(padded_mean(part.A, weights), server[f"{m}.lora_A"])
        return new

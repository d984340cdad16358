"""Fisher scores of adapter keys per client: how much each layer matters to a client's data.

The empirical Fisher information of a parameter block θ on samples x_1..x_n is Σ_i ‖∇_θ f(x_i)‖²_F
with f the true class's logit (Fed-HeLLo's FIM-HLA, algorithms.md §5.3) or its log-probability.
Gradients are per sample: a cohort of clients is independent, so one backward of the sum over
clients of sample i's objective gives every client's gradient of its own sample i at once; the
loop runs over sample positions, never over clients.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..models.cohort import CohortModel

__all__ = ["fisher_scores", "proxy_scores"]


def fisher_scores(model: CohortModel, adapters: dict[str, torch.Tensor], *, x: torch.Tensor, y: torch.Tensor,
                  indices: list[np.ndarray], keys: list[str], scaling: torch.Tensor | None = None,
                  target: Literal["logit", "log_prob"] = "logit", entries: bool = False) -> dict[str, torch.Tensor]:
    """`{key: [C]}` float64 Σ_i ‖∇_key f(x_i)‖²_F of each client c over its samples `indices[c]`;
    with `entries`, `{key: [C, *shape]}` Σ_i (∇_key f(x_i))², entry by entry (the diagonal
    empirical Fisher, unnormalised).

    Clients with fewer samples sit out the positions past their last one (masked, no gradient)."""
    count = len(indices)
    device = adapters["head.weight"].device
    scores = {k: torch.zeros(count, *(adapters[k].shape[1:] if entries else ()), dtype=torch.float64, device=device)
              for k in keys}
    live = {k: (v.detach().requires_grad_(True) if k in keys else v.detach()) for k, v in adapters.items()}
    for i in range(max((len(ix) for ix in indices), default=0)):
        has = torch.tensor([i < len(ix) for ix in indices], device=device)
        rows = torch.as_tensor(np.array([ix[min(i, len(ix) - 1)] if len(ix) else 0 for ix in indices]))
        logits = model(x[rows].to(device), live, scaling=scaling)                        # [C, classes]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if target == "log_prob":
            logits = F.log_softmax(logits, dim=-1)
        picked = logits.gather(1, y[rows].to(device).view(-1, 1)).view(-1)
        grads = torch.autograd.grad((picked * has).sum(), [live[k] for k in keys])
        for key, g in zip(keys, grads):
            scores[key] += g.double().square() if entries else g.double().flatten(1).square().sum(1)
    return scores


def proxy_scores(model: CohortModel, adapters: dict[str, torch.Tensor], *, x: torch.Tensor, y: torch.Tensor,
                 indices: np.ndarray, keys: list[str], target: Literal["logit", "log_prob"] = "logit",
                 entries: bool = False, chunk: int = 64) -> dict[str, torch.Tensor]:
    """One model's `[1, ...]` Fisher scores on samples `indices` (a server's proxy set): `{key: []}`
    float64 (1/n) Σ_i ‖∇_key f(x_i)‖²_F, or with `entries` `{key: [*shape]}` (1/n) Σ_i (∇_key f(x_i))².

    The samples become a cohort of one-sample clients, `chunk` at a time, so one backward gives
    `chunk` per-sample gradients (`fisher_scores`); the result does not depend on the rank count."""
    indices = np.asarray(indices, dtype=np.int64)
    totals = {k: 0.0 for k in keys}
    for start in range(0, len(indices), chunk):
        part = indices[start:start + chunk]
        cohort = {k: v.expand(len(part), *v.shape[1:]).clone() for k, v in adapters.items()}
        got = fisher_scores(model, cohort, x=x, y=y, indices=[part[i:i + 1] for i in range(len(part))], keys=keys,
                            target=target, entries=entries)
        for k in keys:
            totals[k] = totals[k] + got[k].sum(0)
    return {k: torch.as_tensor(v, dtype=torch.float64) / max(len(indices), 1) for k, v in totals.items()}

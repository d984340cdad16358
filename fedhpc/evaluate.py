"""Accuracy of stacked adapters: per client on local test splits, and of one model on a shared set.

Evaluation batches have a fixed shape (`eval_batch_size` rows per client, padded and masked;
the shared test set in fixed chunks), so a client's predictions never depend on which other
clients share its pass or how many ranks there are.
"""
from __future__ import annotations

import numpy as np
import torch

from .models.cohort import CohortModel
from .runtime.reduce import allreduce_sum
from .runtime.world import block_range

__all__ = ["client_accuracy", "shared_accuracy"]


@torch.no_grad()
def client_accuracy(model: CohortModel, adapters: dict[str, torch.Tensor], *, x: torch.Tensor, y: torch.Tensor,
                    indices: list[np.ndarray], batch: int, scaling: torch.Tensor | None = None) -> np.ndarray:
    """Accuracy `[C]` of client c's adapters on samples `indices[c]` (NaN for an empty split)."""
    count = len(indices)
    device = adapters["head.weight"].device
    correct = torch.zeros(count, dtype=torch.int64, device=device)
    chunks = max((len(ix) + batch - 1) // batch for ix in indices) if count else 0
    for j in range(chunks):
        index = np.zeros((count, batch), dtype=np.int64)
        mask = np.zeros((count, batch), dtype=bool)
        for c, ix in enumerate(indices):
            part = ix[j * batch:(j + 1) * batch]
            if len(part):
                index[c, :len(part)] = part
                index[c, len(part):] = part[0]
                mask[c, :len(part)] = True
            elif len(ix):
                index[c] = ix[0]
        flat = torch.from_numpy(index.reshape(-1))
        pred = model(x[flat].to(device), adapters, scaling=scaling).argmax(-1).view(count, batch)
        hit = (pred == y[flat].to(device).view(count, batch)) & torch.from_numpy(mask).to(device)
        correct += hit.sum(1)
    sizes = np.array([len(ix) for ix in indices], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return correct.cpu().numpy() / sizes


@torch.no_grad()
def shared_accuracy(model: CohortModel, adapters: dict[str, torch.Tensor], *, x: torch.Tensor, y: torch.Tensor,
                    chunk: int, comm) -> float:
    """Accuracy of one model `[1, ...]` on a shared set, its fixed chunks spread over the ranks."""
    device = adapters["head.weight"].device
    num_chunks = (len(y) + chunk - 1) // chunk
    start, stop = block_range(num_chunks, comm.Get_size(), comm.Get_rank())
    correct = 0
    for j in range(start, stop):
        xb, yb = x[j * chunk:(j + 1) * chunk], y[j * chunk:(j + 1) * chunk]
        correct += int((model(xb.to(device), adapters).argmax(-1) == yb.to(device)).sum())
    total = allreduce_sum(torch.tensor([float(correct)]), comm=comm)
    return float(total[0]) / max(len(y), 1)

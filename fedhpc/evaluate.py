"""Accuracy of stacked adapters: per client on local test splits, and of one model on a shared set;
and which adapters each client is evaluated with (seen clients each round, new clients at the end).

Evaluation batches have a fixed shape (`eval_batch_size` rows per client, padded and masked;
the shared test set in fixed chunks), so a client's predictions never depend on which other
clients share its pass or how many ranks there are.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .models.cohort import CohortModel
from .models.ranks import mask_to_ranks
from .train.local import split_passes
from .runtime.reduce import allreduce_sum
from .rng import Purpose, keyed_rng
from .runtime.world import block_range

__all__ = ["client_accuracy", "shared_accuracy", "evaluate_round", "evaluated_clients", "unseen_accuracy"]


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


# --- orchestration: which adapters each client is evaluated with ---------------------------------
GLOBAL_CHUNK = 256  # rows per chunk of the shared test set (fixed: rank-count independent)


def evaluated_clients(seen: np.ndarray, cfg, *, seed: int, round_index: int, final: bool) -> np.ndarray:
    """The seen clients an evaluation measures (sorted, the same on every rank): all of them, or
    a sample of `eval.count` / `eval.fraction` of them keyed by (seed, round) (`eval.final: all`
    measures every client in the last round)."""
    want = cfg.count if cfg.count > 0 else max(1, round(cfg.fraction * len(seen)))
    if want >= len(seen) or (final and cfg.final == "all"):
        return seen
    rng = keyed_rng(seed, round_index, purpose=Purpose.EVAL_SAMPLE)
    return np.sort(rng.choice(seen, size=want, replace=False))


def evaluate_round(run, server, store, *, round_index: int = 0) -> tuple[dict, np.ndarray, np.ndarray]:
    """Round metrics (global accuracy, personalized mean / std / p10 over the evaluated clients),
    the evaluated seen clients (`evaluated_clients`) and their personalized accuracies in that order
    (NaN: empty test split)."""
    data, out = run.data, {}
    global_adapters = run.strategy.global_model(server, run.init)
    out["global_accuracy"] = math.nan if global_adapters is None else shared_accuracy(
        run.model, global_adapters, x=data.global_test_x, y=data.global_test_y, chunk=GLOBAL_CHUNK,
        comm=run.world.comm)
    chosen = evaluated_clients(data.seen, run.cfg.eval, seed=run.cfg.seed, round_index=round_index,
                               final=round_index == run.cfg.rounds)
    lo, hi = int(run.world.clients[0]), int(run.world.clients[-1]) + 1  # a contiguous block
    mine = chosen[(chosen >= lo) & (chosen < hi)]
    accs = []
    for ids in split_passes(mine, run.per_pass):
        adapters = mask_to_ranks(run.strategy.configure_evaluate(server, store.get(ids), ids), run.ranks.of(ids))
        accs.append(_local_accuracy(run, adapters, ids))
    per_client = np.concatenate(run.world.comm.allgather(np.concatenate(accs) if accs else np.zeros(0)))
    accs = per_client[np.isfinite(per_client)]
    if len(accs):
        out.update(personalized_mean=float(accs.mean()), personalized_std=float(accs.std()),
                   personalized_p10=float(np.percentile(accs, 10)))
    if len(chosen) < len(data.seen):
        out["evaluated_clients"] = len(chosen)
    return out, chosen, per_client


def unseen_accuracy(run, server) -> tuple[float, float]:
    """Mean accuracy of held-out clients: zero-shot (after the strategy's probe, if any), then
    after `eval.unseen_finetune_epochs` of local fine-tuning."""
    from .clients import runnable, train_pass
    from .train.plan import Task

    data, cfg, strategy = run.data, run.cfg, run.strategy
    if len(data.unseen) == 0:
        return math.nan, math.nan
    fresh = strategy.init_client(run.init)
    zero, tuned = [], []
    for ids in split_passes(data.unseen[np.isin(data.unseen, run.world.clients)], run.per_pass):
        run_ids, real = runnable(ids), slice(0, len(ids))
        state = {k: v.expand(len(run_ids), *v.shape[1:]) for k, v in fresh.items()}
        probe = strategy.configure_client(server, state, run_ids, Task.PROBE)
        if probe is not None:  # what the probe trained, the new client keeps
            train_pass(run, probe, run_ids, task=Task.PROBE)
            state = {k: probe.start.get(k, v) for k, v in state.items()}
        adapters = mask_to_ranks(strategy.configure_evaluate(server, state, run_ids), run.ranks.of(run_ids))
        zero.append(_local_accuracy(run, adapters, run_ids)[real])
        if cfg.eval.unseen_finetune_epochs > 0:
            plan = strategy.configure_client(server, state, run_ids, Task.FINETUNE)
            train_pass(run, plan, run_ids, task=Task.FINETUNE)
            tuned.append(_local_accuracy(run, plan.start, run_ids)[real])
    gather = lambda parts: np.concatenate(run.world.comm.allgather(np.concatenate(parts) if parts else np.zeros(0)))
    zero_all = gather(zero)
    tuned_all = gather(tuned) if cfg.eval.unseen_finetune_epochs > 0 else np.array([math.nan])
    return float(np.nanmean(zero_all)), float(np.nanmean(tuned_all))


def _local_accuracy(run, adapters: dict[str, torch.Tensor], ids: np.ndarray) -> np.ndarray:
    return client_accuracy(run.model, adapters, x=run.data.test_x, y=run.data.test_y,
                           indices=[run.data.client_test[c] for c in ids], batch=run.cfg.train.eval_batch_size,
                           scaling=run.scaling(ids))

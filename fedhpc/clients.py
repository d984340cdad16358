"""Clients on a rank: their stored state, and local training of a pass of them from a `ClientPlan`.

`train_pass` is the one place the runtime calls `local_train`: a federated round, a new client's
probe and its fine-tuning differ only in the plan and in the `Task`, which fixes the data stream
(the round index of the data-order keys), the length and whether LoRA dropout is on.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from .assemble import Run
from .models.ranks import mask_to_ranks
from .train.local import local_train
from .train.optim import StackedOptimizer
from .train.plan import ClientPlan, Task

__all__ = ["ClientStore", "train_pass", "partial_work", "runnable", "OPTIMIZER"]

OPTIMIZER = "optimizer."  # prefix of the optimizer state in what `finish_client` receives


class ClientStore:
    """What a rank keeps for each client it hosts between rounds: stacked `[clients, ...]`."""

    def __init__(self, clients: np.ndarray, tensors: dict[str, torch.Tensor]):
        self.first = int(clients[0]) if len(clients) else 0
        self.tensors = tensors

    def rows(self, ids: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(ids - self.first, dtype=torch.int64)

    def get(self, ids: np.ndarray) -> dict[str, torch.Tensor]:
        rows = self.rows(ids)
        return {k: v[rows.to(v.device)] for k, v in self.tensors.items()}

    def put(self, ids: np.ndarray, values: dict[str, torch.Tensor]) -> None:
        rows = self.rows(ids)
        for k, v in values.items():
            self.tensors[k][rows.to(v.device)] = v.detach()


def runnable(ids: np.ndarray) -> np.ndarray:
    """A pass never has one client (a one-client batched matmul takes another kernel path, so
    another rounding): a lone client trains twice over, and the copy's results are dropped."""
    return ids if len(ids) > 1 else np.repeat(ids, 2)


def train_pass(run: Run, plan: ClientPlan, ids: np.ndarray, *, task: Task, round_index: int = 0,
               limit: np.ndarray | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Train `plan.start` of clients `ids` in place; returns their mean losses `[C]` and the
    optimizer state after training. `limit` `[C]`: at most this many steps per client (`partial_work`)."""
    cfg, data = run.cfg, run.data
    train_cfg = cfg.train
    if task == Task.FINETUNE:
        train_cfg = replace(cfg.train, local_epochs=max(1, cfg.eval.unseen_finetune_epochs), local_steps=0)
        round_index = cfg.rounds + 1
    elif task == Task.PROBE:
        round_index = cfg.rounds + 2
    if plan.steps > 0:
        train_cfg = replace(train_cfg, local_steps=plan.steps)
    opt_cfg = cfg.train.optimizer
    if task == Task.FINETUNE and cfg.eval.unseen_finetune_lr_scale != 1.0:
        opt_cfg = replace(opt_cfg, lr=opt_cfg.lr * cfg.eval.unseen_finetune_lr_scale)
    optimizer = plan.optimizer or StackedOptimizer(opt_cfg)
    if not hasattr(optimizer, "step"):  # the plan's own optimizer, made for the run's settings
        optimizer = optimizer(opt_cfg)
    opt_state = plan.opt_state
    if opt_state is None:
        opt_state = optimizer.init_state({k: plan.start[k] for k in plan.trainable})
    plan.start.update(mask_to_ranks(plan.start, run.ranks.of(ids)))  # each client starts at its own rank
    losses = local_train(run.model, adapters=plan.start, opt_state=opt_state, trainable=plan.trainable,
                         x=data.train_x, y=data.train_y, client_ids=ids,
                         client_indices=[data.client_train[c] for c in ids], seed=cfg.seed,
                         round_index=round_index, cfg=train_cfg, hooks=plan.hooks, optimizer=optimizer,
                         dropout=task == Task.TRAIN and cfg.lora.lora_dropout > 0,
                         scaling=run.scaling(ids), ranks=run.ranks.of(ids), limit=limit)
    return losses, opt_state


def partial_work(run: Run, ids: np.ndarray, work: np.ndarray, *, round_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Late clients' share of a round's training (`runtime/faults.py`): `[C]` steps each client
    takes (`steps_done` of its round's steps for a fraction `work`) and the fraction of its steps
    that is (its upload's weight factor under the `partial` policy), rounded to a multiple of 1/256
    (at least 1/256): a dyadic factor times an integer sample count keeps the weighted float64
    sums of the reduction as exact as unscaled ones, so the rank count changes no bit."""
    from .runtime.faults import steps_done
    from .train.local import client_batches

    data = run.data
    total = np.array([len(client_batches(data.client_train[c], seed=run.cfg.seed, client=int(c),
                                         round_index=round_index, cfg=run.cfg.train)) for c in ids])
    done = np.array([steps_done(int(n), float(w)) for n, w in zip(total, work)], dtype=np.int64)
    return done, np.maximum(1.0, np.round(256 * done / np.maximum(total, 1))) / 256

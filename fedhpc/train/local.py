"""Local training of a whole cohort at once: one forward/backward per step for all its clients.

Each client keeps its own data order (a generator keyed by seed, client id and round) and
its own number of steps; a step feeds every client a batch of exactly `batch_size` rows
(short batches are padded and masked), so what a client computes never depends on which
other clients share its pass. Clients whose data ran out sit the step out (`active`).
"""
from __future__ import annotations

import ctypes
import functools
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..models.cohort import CohortModel
from ..models.dropout import client_keys
from ..models.ranks import mask_to_ranks
from ..rng import Purpose, keyed_rng
from .fused import cohort_forward, precision_context
from .optim import OptimConfig, StackedOptimizer, clip_per_client
from .plan import LocalHooks, Optimizer

__all__ = ["TrainConfig", "LocalHooks", "local_train", "client_batches", "split_passes", "probe_clients_per_pass",
           "keep_freed_memory"]


@dataclass(kw_only=True)
class TrainConfig:
    local_epochs: int = 1
    """Passes over each client's data per round (ignored when local_steps > 0)."""
    local_steps: int = 0
    """If > 0: exactly this many steps per client per round, cycling through its data."""
    batch_size: int = 16
    """Samples per client per step."""
    max_grad_norm: float = 0.0
    """Clip each client's gradient to this norm (0: no clipping)."""
    optimizer: OptimConfig = field(default_factory=OptimConfig)
    clients_per_pass: int = 0
    """Clients fused into one forward pass (1: sequential). 0: chosen by a quick probe; any
    value >= 2 gives the same numbers, so the probe never changes results."""
    eval_batch_size: int = 64
    """Rows per client per evaluation pass."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Local training's forward/backward arithmetic. bf16: the frozen backbone's matmuls and
    attention under bf16 autocast; the adapters' products, head, loss, gradients, adapters and
    optimizer state stay float32 (`train/fused.py`). Changes results by bf16 rounding, so fp32
    is the default; evaluation always runs in fp32."""
    compile: bool = False
    """torch.compile (inductor) the cohort forward and its backward, one static-shape graph per
    pass size, kept across rounds (`train/fused.py`). Results differ from eager by float32
    rounding (fused kernels reorder sums), so it is opt-in; the first pass of each size waits
    for the compiler."""

    def __post_init__(self):
        for name in ("local_epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.local_steps < 0 or self.clients_per_pass < 0 or self.max_grad_norm < 0:
            raise ValueError("local_steps, clients_per_pass and max_grad_norm must be >= 0")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"train.precision must be fp32 or bf16, got '{self.precision}'")


def client_batches(indices: np.ndarray, *, seed: int, client: int, round_index: int, cfg: TrainConfig) -> list[np.ndarray]:
    """This client's batches for this round, from its own keyed generator."""
    rng = keyed_rng(seed, client, round_index, purpose=Purpose.DATA_ORDER)
    n = len(indices)
    if cfg.local_steps > 0:
        epochs = math.ceil(cfg.local_steps * cfg.batch_size / max(n, 1))
        order = np.concatenate([rng.permutation(indices) for _ in range(epochs)])
        return [order[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(cfg.local_steps)]
    batches = []
    for _ in range(cfg.local_epochs):
        order = rng.permutation(indices)
        batches += [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
    return batches


def split_passes(clients: np.ndarray, per_pass: int) -> list[np.ndarray]:
    """Chunks of at most `per_pass` clients; a lone trailing client joins the chunk before it
    (a one-client batched matmul takes a different kernel path, and so different rounding)."""
    chunks = [clients[i:i + per_pass] for i in range(0, len(clients), per_pass)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        last = chunks.pop()
        chunks[-1] = np.concatenate([chunks[-1], last])
    return chunks


@functools.cache
def keep_freed_memory() -> bool:
    """Stop glibc from giving freed activation memory back to the OS; True if it took effect.

    A cohort step allocates and frees hundreds of MB of activations. By default glibc serves
    large blocks with fresh mmap()s and trims the freed heap top, so every step faults each of
    those pages in again and the kernel zeroes them: for 128 clients of a depth-4 ViT on a
    2-core VM, 1.3 M minor faults and ~40 % of the CPU time (system time), against none for
    one client at a time. With no mmap and no trimming the heap keeps its high-water mark and
    later steps reuse it, as torch's CUDA caching allocator does. Process-wide, set once;
    a no-op off Linux/glibc. Changes no result.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>; trim threshold -1: never trim
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, -1))


def local_train(model: CohortModel, *, adapters: dict[str, torch.Tensor], opt_state: dict[str, torch.Tensor],
                trainable: list[str], x: torch.Tensor, y: torch.Tensor, client_ids: np.ndarray,
                client_indices: list[np.ndarray], seed: int, round_index: int, cfg: TrainConfig,
                hooks: LocalHooks, scaling: torch.Tensor | None = None, ranks: torch.Tensor | None = None,
                dropout: bool = False, optimizer: Optimizer | None = None,
                limit: np.ndarray | None = None) -> torch.Tensor:
    """Train these clients' adapters `[C, ...]` in place; returns each client's mean loss `[C]`.

    `opt_state` is the state of `optimizer` (default: the config's `StackedOptimizer`) for the
    same clients.
    `scaling` `[C]` is each client's LoRA scaling; `ranks` `[C]` its true rank: gradients beyond
    it are zeroed (after the hooks), so padded rows of A and columns of B never move.
    `limit` `[C]`: client c takes only the first `limit[c]` of its steps (a late client's partial
    work, `runtime/faults.py`); None: every step.
    """
    count = len(client_ids)
    device = adapters["head.weight"].device
    if device.type == "cpu":
        keep_freed_memory()
    optimizer = optimizer or StackedOptimizer(cfg.optimizer)
    plans = [client_batches(ix, seed=seed, client=int(c), round_index=round_index, cfg=cfg)
             for c, ix in zip(client_ids, client_indices)]
    if limit is not None:
        plans = [p[:int(n)] for p, n in zip(plans, limit)]
    steps = max(len(p) for p in plans)
    loss_sum = torch.zeros(count, dtype=torch.float64, device=device)
    start = {k: v.detach().clone() for k, v in adapters.items()}
    movable = {k: m.to(device) for k in trainable if (m := hooks.movable(k)) is not None}
    ids = torch.as_tensor(client_ids, dtype=torch.int64)
    forward = cohort_forward(model, compile=cfg.compile)
    for step in range(steps):
        index, mask, active = _step_batch(plans, step, cfg.batch_size)
        xb = x[torch.from_numpy(index.reshape(-1))].to(device, non_blocking=True)
        yb = y[torch.from_numpy(index.reshape(-1))].to(device, non_blocking=True)
        mask_t = torch.from_numpy(mask).to(device)
        live = {k: (v.requires_grad_(True) if k in trainable else v) for k, v in adapters.items()}
        probes = {k: p.detach().requires_grad_(True) for k, p in hooks.probes(step).items()}
        live.update(probes)
        keys = client_keys(seed, ids, round_index, step).to(device) if dropout else None
        with precision_context(cfg.precision, xb.device):
            logits = forward(xb, live, scaling=scaling, dropout_keys=keys)
        per_row = F.cross_entropy(logits.float(), yb, reduction="none").view(count, -1)
        per_client = (per_row * mask_t).sum(1) / mask_t.sum(1).clamp(min=1)
        extra = hooks.loss(live, start)
        total = per_client if extra is None else per_client + extra
        grads = torch.autograd.grad(total.sum(), [live[k] for k in trainable] + list(probes.values()))
        probed = dict(zip(probes, grads[len(trainable):]))
        grads = dict(zip(trainable, grads))
        for v in adapters.values():
            v.requires_grad_(False)
        if probed:
            hooks.probed(probed, adapters)
        hooks.grads(grads, adapters)
        for key, keep in movable.items():
            grads[key].mul_(keep)
        if ranks is not None:
            mask_to_ranks(grads, ranks, inplace=True)
        if cfg.max_grad_norm > 0:
            clip_per_client(list(grads.values()), cfg.max_grad_norm)
        active_t = torch.from_numpy(active).to(device)
        optimizer.step(adapters, grads, opt_state, active_t, lr_scale=hooks.lr_scale, movable=movable)
        hooks.stepped(active_t)
        loss_sum += per_client.detach().double() * active_t
    counts = torch.tensor([len(p) for p in plans], dtype=torch.float64, device=device)
    return loss_sum / counts.clamp(min=1)


def _step_batch(plans: list[list[np.ndarray]], step: int, batch: int):
    """Index `[C, batch]` into the pool (padded with the client's first index), row mask, active clients."""
    count = len(plans)
    index = np.zeros((count, batch), dtype=np.int64)
    mask = np.zeros((count, batch), dtype=np.float32)
    active = np.zeros(count, dtype=bool)
    for c, plan in enumerate(plans):
        if step < len(plan):
            rows = plan[step]
            index[c, :len(rows)] = rows
            index[c, len(rows):] = rows[0]
            mask[c, :len(rows)] = 1.0
            active[c] = True
        else:
            index[c] = plan[0][0] if plan else 0
    return index, mask, active


def probe_clients_per_pass(model: CohortModel, *, sample: torch.Tensor, batch_size: int, max_clients: int,
                           trainable: list[str], budget_s: float = 2.0, precision: str = "fp32") -> int:
    """Clients per pass with the best measured clients/s on this device, doubling from 2.

    `sample` is one input row; the probe times forward + backward of a synthetic cohort, in
    `precision` (`train.precision`). It times the eager path even for `train.compile`: a
    compiled graph per probed size would cost the compiler's time many times over.
    Stops after two doublings in a row fail to beat the best rate so far (on a CPU the gain
    per doubling is a few per cent, within timing noise, so one reading must not end the
    search), or once the time budget is spent.
    """
    if sample.device.type == "cpu":
        keep_freed_memory()  # as local_train will: else page faults penalise large passes
    best, best_rate, size, flat = 2, 0.0, 2, 0
    deadline = time.perf_counter() + budget_s
    cap = max(2, max_clients)
    while size <= cap:
        adapters = model.init_adapters(size, torch.Generator().manual_seed(0))
        adapters = {k: v.to(sample.device).requires_grad_(k in trainable) for k, v in adapters.items()}
        xb = sample.expand(size * batch_size, *sample.shape).contiguous()

        def step():
            with precision_context(precision, xb.device):
                out = model(xb, adapters)
            torch.autograd.grad(out.float().square().mean(), [adapters[k] for k in trainable])
            if sample.device.type == "cuda":
                torch.cuda.synchronize(sample.device)  # host sync: time the kernels, not their launch

        step()  # warm-up: the first call at a size also grows the heap
        calls, t0 = 0, time.perf_counter()
        while calls < 2 or time.perf_counter() - t0 < 0.2:  # mean over >= 2 calls and >= 0.2 s
            step()
            calls += 1
        rate = size * calls / (time.perf_counter() - t0)
        flat = 0 if rate > best_rate else flat + 1
        if rate > best_rate:
            best, best_rate = size, rate
        if flat == 2 or time.perf_counter() > deadline:
            break
        size *= 2
    return min(best, cap)

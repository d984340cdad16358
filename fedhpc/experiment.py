"""The round loop: sample, broadcast, train whole cohorts, reduce, aggregate, evaluate, log.

SPMD: every rank runs this same function on its own block of clients; the server state is
replicated and every rank applies the same aggregation to the same collective result, so
the rank count changes no number (see ARCHITECTURE.md, Determinism).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .config import ExperimentConfig, SamplingConfig, to_dict
from .data import build_federated_data
from .evaluate import client_accuracy, shared_accuracy
from .io.run_dir import RunDir
from .models.backbone import build_cohort_model
from .models.teacher import plant_backbone_teacher
from .runtime.reduce import GroupReduction, allreduce_sum
from .runtime.world import World, make_world
from .strategies import build_strategy
from .train.local import local_train, probe_clients_per_pass, split_passes
from .train.optim import StackedOptimizer

__all__ = ["run", "sample_clients", "ClientStore"]

SAMPLING = 2  # purpose tag of the client-sampling stream
GLOBAL_CHUNK = 256  # rows per chunk of the shared test set (fixed: rank-count independent)


def sample_clients(seen: np.ndarray, cfg: SamplingConfig, *, seed: int, round_index: int) -> np.ndarray:
    """This round's participants (sorted), identical on every rank."""
    want = cfg.count if cfg.count > 0 else max(1, round(cfg.fraction * len(seen)))
    if want >= len(seen):
        return seen.copy()
    rng = np.random.default_rng([seed, round_index, SAMPLING])
    return np.sort(rng.choice(seen, size=want, replace=False))


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


@dataclass
class _Run:
    """Everything the loop reads, built once."""
    cfg: ExperimentConfig
    world: World
    data: object
    model: object
    strategy: object
    init: dict
    per_pass: int


def _setup(cfg: ExperimentConfig, comm) -> _Run:
    world = make_world(comm, num_clients=cfg.num_clients, device=cfg.device)
    modality = "text" if cfg.model.family == "hf" else "image"
    data = build_federated_data(cfg.data, num_clients=cfg.num_clients, seed=cfg.seed, modality=modality,
                                seq_len=cfg.model.seq_len)
    model = build_cohort_model(cfg.model, adapter_lora(cfg), num_classes=data.num_classes, seed=cfg.seed,
                               device=world.device)
    if cfg.data.name == "planted" and cfg.data.planted.teacher == "backbone":
        data = plant_backbone_teacher(model, data, cfg=cfg.data.planted, seed=cfg.seed)
    strategy = build_strategy(cfg.strategy, keys=list(model.shapes), groups=data.groups)
    init = {k: v.to(world.device) for k, v in model.init_adapters(1, torch.Generator().manual_seed(cfg.seed)).items()}
    per_pass = cfg.train.clients_per_pass
    if per_pass == 0:
        # Timing decides only how many clients share a pass; any choice >= 2 gives the same
        # numbers, so the probe cannot change results. Rank 0 decides for everyone.
        choice = None
        if world.is_root:
            choice = probe_clients_per_pass(model, sample=data.train_x[0].to(world.device),
                                            batch_size=cfg.train.batch_size, max_clients=max(2, len(world.clients)),
                                            trainable=strategy.trainable())
        per_pass = comm.bcast(choice, root=0)
    return _Run(cfg, world, data, model, strategy, init, per_pass)


def adapter_lora(cfg: ExperimentConfig):
    """The LoRA config the model is built with: the strategy's adapter rank (HiLoRA stacks three
    rank-r tiers into 3r), alpha scaled along so that each rank-r part keeps scaling alpha / r."""
    rank = cfg.strategy.adapter_rank(cfg.lora.r)
    if rank == cfg.lora.r:
        return cfg.lora
    return replace(cfg.lora, r=rank, lora_alpha=cfg.lora.lora_alpha * rank / cfg.lora.r)


def _train_round(r: _Run, server, store: ClientStore, opt_store: ClientStore | None, participants: np.ndarray,
                 round_index: int, exchange):
    """Local training of this rank's participants, pass by pass; returns the reduction and losses."""
    cfg, data, strategy = r.cfg, r.data, r.strategy
    mine = participants[np.isin(participants, r.world.clients)]
    reduction = GroupReduction(exchange.means, exchange.num_groups, exchange.gathered)
    loss_stats = torch.zeros(2, dtype=torch.float64)
    optimizer = StackedOptimizer(cfg.train.optimizer)
    trainable = strategy.trainable()
    for ids in split_passes(mine, r.per_pass):
        run_ids = ids if len(ids) > 1 else np.repeat(ids, 2)  # see split_passes: never a one-client pass
        state = store.get(run_ids)
        adapters = strategy.broadcast(server, state, run_ids)
        opt_state = opt_store.get(run_ids) if opt_store else optimizer.init_state({k: adapters[k] for k in trainable})
        weights = torch.as_tensor(data.num_examples[run_ids], dtype=torch.float64)
        losses = local_train(r.model, adapters=adapters, opt_state=opt_state, trainable=trainable,
                             x=data.train_x, y=data.train_y, client_ids=run_ids,
                             client_indices=[data.client_train[c] for c in run_ids], seed=cfg.seed,
                             round_index=round_index, cfg=cfg.train, hooks=strategy.hooks(server, state, run_ids),
                             dropout=cfg.lora.lora_dropout > 0)
        real = slice(0, len(ids))
        trained = {k: v[real] for k, v in adapters.items()}
        new_state = strategy.update_clients(server, trained, {k: v[real] for k, v in state.items()}, ids)
        store.put(ids, new_state)
        if opt_store:
            opt_store.put(ids, {k: v[real] for k, v in opt_state.items()})
        reduction.add(strategy.contribute(trained, ids, weights[real], server=server, state=new_state))
        loss_stats += torch.stack([(losses[real].cpu() * weights[real]).sum(), weights[real].sum()])
    return reduction, loss_stats


def _personalized(r: _Run, server, store: ClientStore) -> np.ndarray:
    """Accuracy of every seen client's personalized model on its local test split, on every rank."""
    mine = r.world.clients[np.isin(r.world.clients, r.data.seen)]
    accs = []
    for ids in split_passes(mine, r.per_pass):
        adapters = r.strategy.personalized(server, store.get(ids), ids)
        accs.append(client_accuracy(r.model, adapters, x=r.data.test_x, y=r.data.test_y,
                                    indices=[r.data.client_test[c] for c in ids], batch=r.cfg.train.eval_batch_size))
    local = np.concatenate(accs) if accs else np.zeros(0)
    return np.concatenate(r.world.comm.allgather(local))


def _unseen(r: _Run, server) -> tuple[float, float]:
    """Mean accuracy of held-out clients: zero-shot, then after local fine-tuning."""
    data, cfg = r.data, r.cfg
    if len(data.unseen) == 0:
        return math.nan, math.nan
    mine = data.unseen[np.isin(data.unseen, r.world.clients)]
    fresh = _initial_client_state(r)
    zero, tuned = [], []
    tune_cfg = type(cfg.train)(**{**vars(cfg.train), "local_epochs": max(1, cfg.eval.unseen_finetune_epochs),
                                  "local_steps": 0})
    for ids in split_passes(mine, r.per_pass):
        run_ids = ids if len(ids) > 1 else np.repeat(ids, 2)
        kept = {k: v.expand(len(run_ids), *v.shape[1:]) for k, v in fresh.items()}
        train_ix = [data.client_train[c] for c in run_ids]
        probe, probed = r.strategy.unseen_probe(server, kept, run_ids), None
        if probe is not None:
            probed = probe.adapters
            probe_cfg = replace(cfg.train, local_steps=probe.steps)
            local_train(r.model, adapters=probed, opt_state=StackedOptimizer(cfg.train.optimizer).init_state(probed),
                        trainable=list(probed), x=data.train_x, y=data.train_y, client_ids=run_ids,
                        client_indices=train_ix, seed=cfg.seed, round_index=cfg.rounds + 2, cfg=probe_cfg,
                        hooks=probe.hooks)
        adapters, hooks = r.strategy.unseen_start(server, kept, run_ids, probed)
        test = [data.client_test[c] for c in run_ids]
        zero.append(client_accuracy(r.model, adapters, x=data.test_x, y=data.test_y, indices=test,
                                    batch=cfg.train.eval_batch_size)[:len(ids)])
        if cfg.eval.unseen_finetune_epochs > 0:
            trainable = list(adapters)
            opt_state = StackedOptimizer(cfg.train.optimizer).init_state({k: adapters[k] for k in trainable})
            local_train(r.model, adapters=adapters, opt_state=opt_state, trainable=trainable, x=data.train_x,
                        y=data.train_y, client_ids=run_ids, client_indices=train_ix,
                        seed=cfg.seed, round_index=cfg.rounds + 1, cfg=tune_cfg, hooks=hooks)
            tuned.append(client_accuracy(r.model, adapters, x=data.test_x, y=data.test_y, indices=test,
                                         batch=cfg.train.eval_batch_size)[:len(ids)])
    gather = lambda parts: np.concatenate(r.world.comm.allgather(np.concatenate(parts) if parts else np.zeros(0)))
    zero_all = gather(zero)
    tuned_all = gather(tuned) if cfg.eval.unseen_finetune_epochs > 0 else np.array([math.nan])
    return float(np.nanmean(zero_all)), float(np.nanmean(tuned_all))


def _initial_client_state(r: _Run) -> dict[str, torch.Tensor]:
    """What a client holds before its first round `[1, ...]`: kept adapters at init, plus strategy extras."""
    return {**{k: v for k, v in r.init.items() if k in r.strategy.kept()}, **r.strategy.client_state(r.init)}


def run(cfg: ExperimentConfig, *, comm, progress: bool = True) -> dict:
    """Run one experiment; returns the summary (identical on every rank)."""
    t_start = time.perf_counter()
    r = _setup(cfg, comm)
    world, strategy, data = r.world, r.strategy, r.data
    out = RunDir(Path(cfg.out_dir) / cfg.name, active=world.is_root)
    resolved = to_dict(cfg)
    resolved["train"]["clients_per_pass"] = r.per_pass
    out.write_config(resolved)
    say = (lambda *a: print(*a, flush=True)) if (progress and world.is_root) else (lambda *a: None)
    say(f"fedhpc: {cfg.name}: {data.num_clients} clients ({len(data.unseen)} unseen) on {world.size} rank(s), "
        f"{r.per_pass} clients/pass, device {world.device}; {strategy.summary()}")

    server = strategy.init_server(r.init)
    kept = {k: v.expand(len(world.clients), *v.shape[1:]).clone() for k, v in _initial_client_state(r).items()}
    store = ClientStore(world.clients, kept)
    opt_store = None
    if cfg.strategy.keep_optimizer_state:
        trainable = {k: r.init[k].expand(len(world.clients), *r.init[k].shape[1:]) for k in strategy.trainable()}
        opt_store = ClientStore(world.clients, StackedOptimizer(cfg.train.optimizer).init_state(trainable))
    totals = {"bytes_up": 0, "bytes_down": 0, "mpi_bytes": 0}
    metrics = {}
    for round_index in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        # --- SAMPLE (identical on every rank) ---
        sampled = sample_clients(data.seen, cfg.sampling, seed=cfg.seed, round_index=round_index)
        participants = strategy.participants(server, sampled, data.seen)
        exchange = strategy.exchange(server, r.model.shapes)
        # --- DOWN + LOCAL (this rank's participants, whole passes at once) ---
        reduction, loss_stats = _train_round(r, server, store, opt_store, participants, round_index, exchange)
        # --- UP + REDUCE (the only collective on the training path) ---
        reduced, sent = reduction.finish(comm=comm)
        loss_total = allreduce_sum(torch.cat([loss_stats, torch.tensor([float(sent)])]), comm=comm)
        train_loss = float(loss_total[0] / loss_total[1])
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"round {round_index}: training loss is {train_loss}; lower train.optimizer.lr")
        # --- AGGREGATE (replicated) ---
        server = strategy.aggregate(server, reduced, round_index=round_index)
        totals["bytes_up"] += exchange.bytes_up * len(participants)
        totals["bytes_down"] += exchange.bytes_down * len(participants)
        totals["mpi_bytes"] += int(loss_total[2])
        # --- EVALUATE + LOG ---
        metrics = {"round": round_index, "train_loss": train_loss, "participants": len(participants), **totals,
                   **strategy.metrics(server)}
        if round_index % cfg.eval.every == 0 or round_index == cfg.rounds:
            metrics.update(_evaluate(r, server, store))
        elapsed = time.perf_counter() - t0
        metrics.update(round_seconds=elapsed, clients_per_second=len(participants) / elapsed)
        out.log_round(metrics)
        say(f"round {round_index:>3}/{cfg.rounds}  loss {train_loss:.4f}  "
            f"global {metrics.get('global_accuracy', math.nan):.4f}  "
            f"personalized {metrics.get('personalized_mean', math.nan):.4f}  "
            f"{metrics['clients_per_second']:.1f} clients/s")
    unseen_zero, unseen_tuned = _unseen(r, server)
    summary = {
        "name": cfg.name, "strategy": cfg.strategy.name, "rounds": cfg.rounds, "ranks": world.size,
        "clients_per_pass": r.per_pass,
        "global_accuracy": metrics.get("global_accuracy", math.nan),
        "personalized_mean": metrics.get("personalized_mean", math.nan),
        "personalized_std": metrics.get("personalized_std", math.nan),
        "personalized_p10": metrics.get("personalized_p10", math.nan),
        "unseen_accuracy": unseen_zero, "unseen_accuracy_finetuned": unseen_tuned,
        "final_train_loss": metrics.get("train_loss", math.nan),
        **totals, **strategy.metrics(server), "wall_seconds": time.perf_counter() - t_start,
    }
    out.write_summary(summary)
    say(f"fedhpc: done in {summary['wall_seconds']:.1f}s; summary in {out.path / 'summary.json'}")
    return summary


def _evaluate(r: _Run, server, store: ClientStore) -> dict:
    out = {}
    global_adapters = r.strategy.global_model(server, r.init)
    out["global_accuracy"] = math.nan if global_adapters is None else shared_accuracy(
        r.model, global_adapters, x=r.data.global_test_x, y=r.data.global_test_y, chunk=GLOBAL_CHUNK, comm=r.world.comm)
    accs = _personalized(r, server, store)
    accs = accs[np.isfinite(accs)]
    if len(accs):
        out.update(personalized_mean=float(accs.mean()), personalized_std=float(accs.std()),
                   personalized_p10=float(np.percentile(accs, 10)))
    return out

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
from .io.checkpoint import CheckpointError, Checkpointer
from .io.checkpoint import load as load_checkpoint
from .io.run_dir import RunDir
from .models.backbone import build_cohort_model
from .models.ranks import ClientRanks, mask_to_ranks, numel_at_rank
from .models.teacher import plant_backbone_teacher
from .runtime.preempt import Preempted, PreemptionGuard
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
    ranks: ClientRanks


def _setup(cfg: ExperimentConfig, comm) -> _Run:
    world = make_world(comm, num_clients=cfg.num_clients, device=cfg.device)
    modality = "text" if cfg.model.family == "hf" else "image"
    data = build_federated_data(cfg.data, num_clients=cfg.num_clients, seed=cfg.seed, modality=modality,
                                seq_len=cfg.model.seq_len)
    lora = adapter_lora(cfg)
    ranks = ClientRanks(lora.client_ranks(cfg.num_clients, seed=cfg.seed), lora.lora_alpha)
    model = build_cohort_model(cfg.model, lora, num_classes=data.num_classes, seed=cfg.seed, device=world.device,
                               rank=ranks.max)
    if cfg.data.name == "planted" and cfg.data.planted.teacher == "backbone":
        data = plant_backbone_teacher(model, data, cfg=cfg.data.planted, seed=cfg.seed)
    strategy = build_strategy(cfg.strategy, keys=list(model.shapes), groups=data.groups, ranks=ranks)
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
    return _Run(cfg, world, data, model, strategy, init, per_pass, ranks)


def adapter_lora(cfg: ExperimentConfig):
    """The LoRA config the model is built with: the strategy's adapter rank (HiLoRA stacks three
    rank-r tiers into 3r), alpha scaled along so that each rank-r part keeps scaling alpha / r."""
    rank = cfg.strategy.adapter_rank(cfg.lora.r)
    if rank == cfg.lora.r:
        return cfg.lora
    if cfg.lora.ranks or cfg.lora.client_tiers or cfg.lora.rank_choices:
        raise ValueError(f"strategy {cfg.strategy.name} gives every client one rank (lora.r); "
                         "remove lora.ranks / lora.client_tiers / lora.rank_choices")
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
        adapters = _start(r, server, state, run_ids)
        opt_state = opt_store.get(run_ids) if opt_store else optimizer.init_state({k: adapters[k] for k in trainable})
        weights = torch.as_tensor(data.num_examples[run_ids], dtype=torch.float64)
        hooks = strategy.hooks(server, state, run_ids)
        losses = local_train(r.model, adapters=adapters, opt_state=opt_state, trainable=trainable,
                             x=data.train_x, y=data.train_y, client_ids=run_ids,
                             client_indices=[data.client_train[c] for c in run_ids], seed=cfg.seed,
                             round_index=round_index, cfg=cfg.train, hooks=hooks, dropout=cfg.lora.lora_dropout > 0,
                             scaling=_scaling(r, run_ids), ranks=r.ranks.of(run_ids))
        real = slice(0, len(ids))
        trained = {k: v[real] for k, v in {**adapters, **hooks.results()}.items()}
        new_state = strategy.update_clients(server, trained, {k: v[real] for k, v in state.items()}, ids)
        store.put(ids, new_state)
        if opt_store:
            opt_store.put(ids, {k: v[real] for k, v in opt_state.items()})
        reduction.add(strategy.contribute(trained, ids, weights[real], server=server, state=new_state))
        loss_stats += torch.stack([(losses[real].cpu() * weights[real]).sum(), weights[real].sum()])
    return reduction, loss_stats


def _personalized(r: _Run, server, store: ClientStore) -> np.ndarray:
    """Accuracy of every seen client's personalized model on its local test split (in the
    order of `data.seen`, which is sorted), on every rank."""
    mine = r.world.clients[np.isin(r.world.clients, r.data.seen)]
    accs = []
    for ids in split_passes(mine, r.per_pass):
        adapters = mask_to_ranks(r.strategy.personalized(server, store.get(ids), ids), r.ranks.of(ids))
        accs.append(client_accuracy(r.model, adapters, x=r.data.test_x, y=r.data.test_y,
                                    indices=[r.data.client_test[c] for c in ids], batch=r.cfg.train.eval_batch_size,
                                    scaling=_scaling(r, ids)))
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
        adapters = mask_to_ranks(adapters, r.ranks.of(run_ids))  # as `_start` does for seen clients
        test = [data.client_test[c] for c in run_ids]
        scaling = _scaling(r, run_ids)
        zero.append(client_accuracy(r.model, adapters, x=data.test_x, y=data.test_y, indices=test,
                                    batch=cfg.train.eval_batch_size, scaling=scaling)[:len(ids)])
        if cfg.eval.unseen_finetune_epochs > 0:
            trainable = [k for k in adapters if k in r.model.shapes]  # not a shared base delta
            opt_state = StackedOptimizer(cfg.train.optimizer).init_state({k: adapters[k] for k in trainable})
            local_train(r.model, adapters=adapters, opt_state=opt_state, trainable=trainable, x=data.train_x,
                        y=data.train_y, client_ids=run_ids, client_indices=train_ix,
                        seed=cfg.seed, round_index=cfg.rounds + 1, cfg=tune_cfg, hooks=hooks, scaling=scaling,
                        ranks=r.ranks.of(run_ids))
            tuned.append(client_accuracy(r.model, adapters, x=data.test_x, y=data.test_y, indices=test,
                                         batch=cfg.train.eval_batch_size, scaling=scaling)[:len(ids)])
    gather = lambda parts: np.concatenate(r.world.comm.allgather(np.concatenate(parts) if parts else np.zeros(0)))
    zero_all = gather(zero)
    tuned_all = gather(tuned) if cfg.eval.unseen_finetune_epochs > 0 else np.array([math.nan])
    return float(np.nanmean(zero_all)), float(np.nanmean(tuned_all))


def _initial_client_state(r: _Run) -> dict[str, torch.Tensor]:
    """What a client holds before its first round `[1, ...]`: kept adapters at init, plus strategy extras."""
    return {**{k: v for k, v in r.init.items() if k in r.strategy.kept()}, **r.strategy.client_state(r.init)}


def _start(r: _Run, server, state, ids: np.ndarray) -> dict[str, torch.Tensor]:
    """The strategy's starting adapters for these clients, cut to each client's rank."""
    return mask_to_ranks(r.strategy.broadcast(server, state, ids), r.ranks.of(ids))


def _scaling(r: _Run, ids: np.ndarray) -> torch.Tensor:
    return r.ranks.scaling(ids).to(r.world.device)


def _round_bytes(r: _Run, participants: np.ndarray, exchange) -> tuple[int, int]:
    """Bytes up and down this round on the modelled client-server wire (float32): the strategy's own
    count when it gives one, else its sent keys with each client's tensors at its true rank."""
    if exchange.bytes_up is not None:
        return exchange.bytes_up * len(participants), exchange.bytes_down * len(participants)
    strategy, shapes = r.strategy, r.model.shapes
    ranks = r.ranks.ranks[participants]

    def size(keys: list[str], rank: int) -> int:
        return sum(numel_at_rank(k, strategy.shape_of(k, shapes), rank) for k in keys) * 4

    up_keys, down_keys = strategy.sent_up() + strategy.gathered_up(), strategy.sent_down()
    up = sum(size(up_keys, int(rk)) for rk in ranks)
    down = sum(size(down_keys, strategy.down_rank(int(rk), ranks)) for rk in ranks)
    return up, down


def _fresh_state(r: _Run) -> tuple[dict, ClientStore, ClientStore | None]:
    """Server state, client store and optimizer store (if kept) before round 1."""
    clients, strategy = r.world.clients, r.strategy
    server = strategy.init_server(r.init, frozen=r.model.frozen_weights())
    kept = {k: v.expand(len(clients), *v.shape[1:]).clone() for k, v in _initial_client_state(r).items()}
    opt_store = None
    if r.cfg.strategy.keep_optimizer_state:
        trainable = {k: r.init[k].expand(len(clients), *r.init[k].shape[1:]) for k in strategy.trainable()}
        opt_store = ClientStore(clients, StackedOptimizer(r.cfg.train.optimizer).init_state(trainable))
    return server, ClientStore(clients, kept), opt_store


def _restore(store: ClientStore, saved: dict[str, torch.Tensor] | None, what: str) -> None:
    """Replace a store's tensors by a checkpoint's rows, refusing a checkpoint of another layout."""
    if saved is None or set(saved) != set(store.tensors) or any(
            saved[k].shape != v.shape for k, v in store.tensors.items()):
        raise CheckpointError(f"checkpoint {what} tensors do not match this run's strategy and model "
                              f"(saved: {sorted(saved or [])}, needed: {sorted(store.tensors)})")
    store.tensors = saved


def run(cfg: ExperimentConfig, *, comm, progress: bool = True, resume: str | Path | None = None) -> dict:
    """Run one experiment, or continue it from the checkpoint file `resume`; returns the summary
    (identical on every rank). SIGTERM / SIGUSR1 end it early with a checkpoint (`Preempted`)."""
    with PreemptionGuard() as guard:
        return _run(cfg, comm=comm, progress=progress, resume=resume, guard=guard)


def _run(cfg: ExperimentConfig, *, comm, progress: bool, resume, guard: PreemptionGuard) -> dict:
    t_start = time.perf_counter()
    r = _setup(cfg, comm)
    world, strategy, data = r.world, r.strategy, r.data
    resolved = to_dict(cfg)
    resolved["train"]["clients_per_pass"] = r.per_pass
    say = (lambda *a: print(*a, flush=True)) if (progress and world.is_root) else (lambda *a: None)
    server, store, opt_store = _fresh_state(r)
    totals = {"bytes_up": 0, "bytes_down": 0, "mpi_bytes": 0}
    history, wall_before, first = [], 0.0, 1
    if resume is not None:
        saved = load_checkpoint(resume, clients=world.clients, device=world.device)
        _restore(store, saved.clients, "client")
        if opt_store is not None:
            _restore(opt_store, saved.optimizer, "optimizer")
        server, totals, history, wall_before, first = (saved.server, saved.totals, saved.metrics,
                                                       saved.wall_seconds, saved.round + 1)
    run_dir = Path(cfg.out_dir) / cfg.name
    out = RunDir(run_dir, active=world.is_root, history=history)
    out.write_config(resolved)
    checkpoints = Checkpointer(run_dir, cfg.checkpoint, comm=comm, rounds=cfg.rounds, config=resolved,
                               num_clients=data.num_clients, fresh=resume is None)
    say(f"fedhpc: {cfg.name}: {data.num_clients} clients ({len(data.unseen)} unseen) on {world.size} rank(s), "
        f"{r.per_pass} clients/pass, device {world.device}; {strategy.summary()}")
    if resume is not None:
        say(f"fedhpc: resumed from {resume} (round {first - 1} of {cfg.rounds})")
    metrics = history[-1] if history else {}
    for round_index in range(first, cfg.rounds + 1):
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
        up, down = _round_bytes(r, participants, exchange)
        totals["bytes_up"] += up
        totals["bytes_down"] += down
        totals["mpi_bytes"] += int(loss_total[2])
        # --- EVALUATE + LOG ---
        metrics = {"round": round_index, "train_loss": train_loss, "participants": len(participants), **totals,
                   **strategy.metrics(server)}
        if round_index % cfg.eval.every == 0 or round_index == cfg.rounds:
            evaluated, per_client = _evaluate(r, server, store)
            metrics.update(evaluated)
            out.write_client_accuracy(round_index, data.seen, per_client)
        elapsed = time.perf_counter() - t0
        metrics.update(round_seconds=elapsed, clients_per_second=len(participants) / elapsed)
        out.log_round(metrics)
        history.append(metrics)
        say(f"round {round_index:>3}/{cfg.rounds}  loss {train_loss:.4f}  "
            f"global {metrics.get('global_accuracy', math.nan):.4f}  "
            f"personalized {metrics.get('personalized_mean', math.nan):.4f}  "
            f"{metrics['clients_per_second']:.1f} clients/s")
        # --- CHECKPOINT (in the background) / PREEMPTION (agreed by all ranks) ---
        preempted = guard.agreed(comm=comm)
        if checkpoints.due(round_index) or preempted:
            path = checkpoints.save(round_index, server=server, clients=store.tensors,
                                    optimizer=opt_store.tensors if opt_store else None, totals=totals,
                                    metrics=history, wall_seconds=wall_before + time.perf_counter() - t_start,
                                    wait=preempted)
        if preempted:
            raise Preempted(round_index, path)
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
        **totals, **strategy.metrics(server), "wall_seconds": wall_before + time.perf_counter() - t_start,
    }
    checkpoints.wait()  # the last checkpoint is on disk before the summary says "done"
    out.write_summary(summary)
    say(f"fedhpc: done in {summary['wall_seconds']:.1f}s; summary in {out.path / 'summary.json'}")
    return summary


def _evaluate(r: _Run, server, store: ClientStore) -> tuple[dict, np.ndarray]:
    """Round metrics, and each seen client's personalized accuracy (NaN: empty test split)."""
    out = {}
    global_adapters = r.strategy.global_model(server, r.init)
    out["global_accuracy"] = math.nan if global_adapters is None else shared_accuracy(
        r.model, global_adapters, x=r.data.global_test_x, y=r.data.global_test_y, chunk=GLOBAL_CHUNK, comm=r.world.comm)
    per_client = _personalized(r, server, store)
    accs = per_client[np.isfinite(per_client)]
    if len(accs):
        out.update(personalized_mean=float(accs.mean()), personalized_std=float(accs.std()),
                   personalized_p10=float(np.percentile(accs, 10)))
    return out, per_client

"""The round loop: sample, plan, train whole cohorts, reduce, aggregate, evaluate, log.

SPMD: every rank runs this same function on its own block of clients; the server state is
replicated and every rank applies the same aggregation to the same collective result, so
the rank count changes no number (see ARCHITECTURE.md, Determinism).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .assemble import Run, assemble
from .clients import OPTIMIZER, ClientStore, partial_work, runnable, train_pass
from .config import ExperimentConfig, SamplingConfig, to_dict
from .evaluate import evaluate_round, unseen_accuracy
from .io.checkpoint import CheckpointError, Checkpointer
from .io.checkpoint import load as load_checkpoint
from .io.checkpoint import restore_rows
from .io.progress import Progress
from .io.run_dir import RunDir
from .rng import Purpose, keyed_rng
from .runtime.world import local_rank
from .store import MB, default_cap_bytes, make_store
from .runtime.exchange import modelled_bytes
from .runtime.faults import RoundFaults, agree_diverged, check_server, draw_faults, keep_rows, nonfinite_clients
from .runtime.preempt import Preempted, PreemptionGuard, hold_for_signal
from .runtime.reduce import Reduction, allreduce_sum
from .strategies import RoundPlan
from .train.local import split_passes
from .train.optim import StackedOptimizer
from .train.plan import Task
from .train.scoring import proxy_scores

__all__ = ["run", "sample_clients"]


def sample_clients(seen: np.ndarray, cfg: SamplingConfig, *, seed: int, round_index: int) -> np.ndarray:
    """This round's participants (sorted), identical on every rank."""
    want = cfg.count if cfg.count > 0 else max(1, round(cfg.fraction * len(seen)))
    if want >= len(seen):
        return seen.copy()
    rng = keyed_rng(seed, round_index, purpose=Purpose.SAMPLING)
    return np.sort(rng.choice(seen, size=want, replace=False))


@dataclass
class _State:
    """What changes from round to round (and what a checkpoint holds)."""
    server: dict
    store: ClientStore
    opt_store: ClientStore | None
    totals: dict = field(default_factory=lambda: {"bytes_up": 0, "bytes_down": 0, "mpi_bytes": 0})
    history: list = field(default_factory=list)
    wall_before: float = 0.0
    first: int = 1


def run(cfg: ExperimentConfig, *, comm, progress: bool = True, resume: str | Path | None = None,
        guard: PreemptionGuard | None = None) -> dict:
    """Run one experiment, or continue it from the checkpoint file `resume`; returns the summary
    (identical on every rank). SIGTERM / SIGUSR1 end it early with a checkpoint (`Preempted`):
    caught by `guard` (`fedhpc run` installs one for the whole process), else by one entered for
    the run's duration."""
    if guard is not None:
        return _run(cfg, comm=comm, progress=progress, resume=resume, guard=guard)
    with PreemptionGuard() as guard:
        return _run(cfg, comm=comm, progress=progress, resume=resume, guard=guard)


def _run(cfg: ExperimentConfig, *, comm, progress: bool, resume, guard: PreemptionGuard) -> dict:
    t_start = time.perf_counter()
    r = assemble(cfg, comm)
    resolved = to_dict(cfg)
    resolved["train"]["clients_per_pass"] = r.per_pass
    bar = Progress(rounds=cfg.rounds, active=progress and r.world.is_root)  # live on a terminal, lines otherwise
    say = bar.say
    s = _fresh_state(r) if resume is None else _resumed_state(r, resume)
    run_dir = Path(cfg.out_dir) / cfg.name
    out = RunDir(run_dir, active=r.world.is_root, history=s.history)
    out.write_config(resolved)
    checkpoints = Checkpointer(run_dir, cfg.checkpoint, comm=comm, rounds=cfg.rounds, config=resolved,
                               num_clients=r.data.num_clients, fresh=resume is None)
    say(f"fedhpc: {cfg.name}: {r.data.num_clients} clients ({len(r.data.unseen)} unseen) on {r.world.size} rank(s), "
        f"{r.per_pass} clients/pass, device {r.world.device}; {r.strategy.summary()}")
    if resume is not None:
        say(f"fedhpc: resumed from {resume} (round {s.first - 1} of {cfg.rounds})")
    metrics = s.history[-1] if s.history else {}
    for round_index in range(s.first, cfg.rounds + 1):
        metrics = _round(r, s, round_index, out)
        bar.round(round_index, metrics)
        hold_for_signal(guard, round_index, comm=comm, say=lambda line: r.world.is_root and print(line, flush=True))
        preempted = guard.agreed(comm=comm)  # every rank agrees; then checkpoint in the background
        if checkpoints.due(round_index) or preempted:
            path = checkpoints.save(round_index, server=s.server, clients=_rows(s.store),
                                    optimizer=_rows(s.opt_store) if s.opt_store else None, totals=s.totals,
                                    metrics=s.history, wall_seconds=s.wall_before + time.perf_counter() - t_start,
                                    wait=preempted)
        if preempted:  # the checkpoint it names is the newest on disk (an older one if this write failed)
            raise Preempted(round_index, checkpoints.latest if r.world.is_root and checkpoints.latest else path)
    summary = _summary(r, s, metrics, wall=s.wall_before + time.perf_counter() - t_start)
    checkpoints.wait()  # the last checkpoint is on disk before the summary says "done"
    out.write_summary(summary)
    say(f"fedhpc: done in {summary['wall_seconds']:.1f}s; summary in {out.path / 'summary.json'}")
    return summary


def _round(r: Run, s: _State, round_index: int, out: RunDir) -> dict:
    """One round: plan, local training (this rank's participants), reduce, aggregate, evaluate, log."""
    t0 = time.perf_counter()
    sampled = sample_clients(r.data.seen, r.cfg.sampling, seed=r.cfg.seed, round_index=round_index)
    s.server = _score_proxy(r, s.server, round_index)
    plan = r.strategy.configure_train(s.server, sampled, r.data.seen)
    faults = draw_faults(r.cfg.faults, plan.participants, seed=r.cfg.seed, round_index=round_index)
    position = {int(c): i for i, c in enumerate(plan.participants)}  # client id -> its column of the loss table
    reduction, client_losses, diverged = _train_round(r, s, plan, round_index, faults, position)
    reduced, sent = reduction.finish(comm=r.world.comm)  # the only collectives on the training path
    totals = allreduce_sum(torch.cat([client_losses.flatten(), torch.tensor([float(sent), float(len(diverged))])]),
                           comm=r.world.comm)
    diverged = agree_diverged(diverged, int(totals[-1]), cfg=r.cfg.faults, round_index=round_index,
                              comm=r.world.comm)  # under faults.diverged=stop: one line, every rank
    loss_total = _weighted_loss(totals[:-2].view(2, -1), position, faults.returned, r.per_pass)
    train_loss = float(loss_total[0] / loss_total[1]) if loss_total[1] > 0 else math.nan  # nan: nobody returned
    if loss_total[1] > 0 and not math.isfinite(train_loss):
        raise FloatingPointError(f"round {round_index}: training loss is {train_loss}; lower train.optimizer.lr")
    if len(faults.returned) > len(diverged) or not r.cfg.faults.logged:  # nobody returned: the server state stays
        before, s.server = s.server, r.strategy.aggregate_train(s.server, reduced, round_index=round_index)
        check_server(before, s.server, round_index=round_index, strategy=r.cfg.strategy.name)
    up, _ = modelled_bytes(plan.exchange, faults.returned, r.ranks.ranks, r.data.num_examples)  # dropped: no upload
    _, down = modelled_bytes(plan.exchange, plan.participants, r.ranks.ranks, r.data.num_examples)
    s.totals.update(bytes_up=s.totals["bytes_up"] + up, bytes_down=s.totals["bytes_down"] + down,
                    mpi_bytes=s.totals["mpi_bytes"] + int(totals[-2]))
    metrics = {"round": round_index, "train_loss": train_loss, "participants": len(plan.participants), **s.totals,
               **r.strategy.metrics(s.server)}
    if r.cfg.faults.logged:
        metrics.update(returned=len(faults.returned), dropped=len(faults.dropped), late=len(faults.late),
                       diverged=len(diverged))
    if len(diverged) and r.world.is_root:
        print(f"fedhpc: warning: round {round_index}: client(s) {', '.join(map(str, diverged))} diverged (loss or "
              f"update NaN / inf); left out of the aggregate, their state kept from before the round", flush=True)
    if round_index % r.cfg.eval.every == 0 or round_index == r.cfg.rounds:
        evaluated, chosen, per_client = evaluate_round(r, s.server, s.store, round_index=round_index)
        metrics.update(evaluated)
        out.write_client_accuracy(round_index, chosen, per_client)
    elapsed = time.perf_counter() - t0
    metrics.update(round_seconds=elapsed, clients_per_second=len(plan.participants) / elapsed)
    out.log_round(metrics)
    s.history.append(metrics)
    return metrics


def _score_proxy(r: Run, server: dict, round_index: int) -> dict:
    """A strategy's optional step before planning a round: the Fisher scores of a model it names
    on the server's proxy set. Rank 0 computes them and every rank receives the same float64."""
    request = r.strategy.configure_score(server, round_index=round_index)
    if request is None:
        return server
    if len(r.proxy) == 0:
        raise ValueError(f"strategy {r.cfg.strategy.name} asks for proxy-set scores but holds no proxy set "
                         "(its config's proxy_samples() is 0)")
    scores = None
    if r.world.is_root:
        adapters = {k: v.to(r.world.device) for k, v in request.adapters.items()}
        scores = {k: v.cpu() for k, v in proxy_scores(
            r.model, adapters, x=r.data.train_x, y=r.data.train_y, indices=r.proxy, keys=request.keys,
            target=request.target, entries=request.entries, chunk=r.cfg.train.eval_batch_size).items()}
    scores = r.world.comm.bcast(scores, root=0)  # pickled: a few tensors of the adapters' size at most
    return r.strategy.aggregate_score(server, scores, round_index=round_index)


def _train_round(r: Run, s: _State, plan: RoundPlan, round_index: int, faults: RoundFaults,
                 position: dict[int, int]) -> tuple[Reduction, torch.Tensor, list[int]]:
    """Local training of this rank's participants that return (`faults`), pass by pass, each pass's
    upload reduced as it ends; also `[2, participants]` float64 (loss × examples, examples) at this
    rank's trained clients' positions (`position`: client id -> index in `plan.participants`), 0
    elsewhere, and the ids of its clients that diverged (not reduced)."""
    mine = faults.returned[np.isin(faults.returned, r.world.clients)]
    reduction = Reduction(plan.exchange, r.data.num_examples)
    client_losses = torch.zeros(2, len(plan.participants), dtype=torch.float64)
    diverged = []
    for ids in split_passes(mine, r.per_pass):
        run_ids, real = runnable(ids), slice(0, len(ids))
        state = s.store.get(run_ids)
        client_plan = r.strategy.configure_client(s.server, state, run_ids, Task.TRAIN)
        if s.opt_store is not None and client_plan.opt_state is None:
            client_plan.opt_state = s.opt_store.get(run_ids)
        work, scale = faults.work_of(run_ids), None
        if work is not None:  # late clients under faults.policy=partial: their first steps only
            work, scale = partial_work(r, run_ids, work, round_index=round_index)
            scale = scale[real]
        losses, opt_state = train_pass(r, client_plan, run_ids, task=Task.TRAIN, round_index=round_index,
                                       limit=work)
        trained = {**client_plan.start, **client_plan.hooks.results(),
                   **{OPTIMIZER + k: v for k, v in opt_state.items()}}
        new_state, upload = r.strategy.finish_client(s.server, {k: v[real] for k, v in trained.items()},
                                                     {k: v[real] for k, v in state.items()}, ids)
        opt_rows, losses = {k: v[real] for k, v in opt_state.items()}, losses[real]
        bad = nonfinite_clients(losses, new_state, upload)
        if bad.any():  # named after the reduction; kept out of it, their state as before the round
            diverged += ids[bad].tolist()
            keep = torch.as_tensor(~bad)
            ids, scale = ids[~bad], None if scale is None else scale[~bad]
            new_state, upload, opt_rows = (keep_rows(part, keep) for part in (new_state, upload, opt_rows))
            losses = losses[keep.to(losses.device)]
            if len(ids) == 0:
                continue
        s.store.put(ids, new_state)
        if s.opt_store is not None:
            s.opt_store.put(ids, opt_rows)
        reduction.add(ids, upload, scale)
        weights = torch.as_tensor(r.data.num_examples[ids], dtype=torch.float64)
        at = [position[int(c)] for c in ids]
        client_losses[:, at] = torch.stack([losses.cpu() * weights, weights])  # exact: float32 × count
    return reduction, client_losses, diverged


def _weighted_loss(client_losses: torch.Tensor, position: dict[int, int], returned: np.ndarray,
                   per_pass: int) -> torch.Tensor:
    """(Σ loss × examples, Σ examples) over the clients that trained, summed pass by pass in the
    one-rank order whatever the rank count (the sum of floats depends on its order); `position`:
    client id -> its column of `client_losses`."""
    total = torch.zeros(2, dtype=torch.float64)
    for ids in split_passes(returned, per_pass):
        loss_weighted, weights = client_losses[:, [position[int(c)] for c in ids]]
        kept = weights > 0  # diverged clients weigh 0 and are left out
        total += torch.stack([loss_weighted[kept].sum(), weights[kept].sum()])
    return total


def _summary(r: Run, s: _State, metrics: dict, *, wall: float) -> dict:
    unseen_zero, unseen_tuned = unseen_accuracy(r, s.server)
    return {
        "name": r.cfg.name, "strategy": r.cfg.strategy.name, "rounds": r.cfg.rounds, "ranks": r.world.size,
        "clients_per_pass": r.per_pass,
        **{k: metrics.get(k, math.nan) for k in ("global_accuracy", "personalized_mean", "personalized_std",
                                                 "personalized_p10")},
        "unseen_accuracy": unseen_zero, "unseen_accuracy_finetuned": unseen_tuned,
        "final_train_loss": metrics.get("train_loss", math.nan),
        **s.totals, **r.strategy.metrics(s.server), "wall_seconds": wall,
    }


def _fresh_state(r: Run) -> _State:
    """Server state, client store and optimizer store (if kept) before round 1: in memory when they
    fit under `store.memory_cap_mb` in float32, else paged (fedhpc/store.py)."""
    clients = r.world.clients
    server = r.strategy.init_server(r.init, frozen=r.model.frozen_weights())
    kept = {k: v[:1] for k, v in r.strategy.init_client(r.init).items()}
    opt_init = None
    if r.cfg.strategy.keep_optimizer_state:
        params = {k: r.init[k][:1] for k in r.model.shapes}
        opt_init = StackedOptimizer(r.cfg.train.optimizer).init_state(params)
    cfg = r.cfg.store
    cap = int(cfg.memory_cap_mb * MB) if cfg.memory_cap_mb > 0 else default_cap_bytes(local_rank(r.world.comm)[1])
    row = lambda init: sum(v[0].numel() * v.element_size() for v in (init or {}).values())
    share = row(kept) / max(row(kept) + row(opt_init), 1)  # the cap is split by row bytes
    folder = Path(r.cfg.out_dir) / r.cfg.name / "store"
    make = lambda init, part, what: make_store(clients, init, path=folder / f"{what}-rank{r.world.rank:05d}.bin",
                                              cap_bytes=int(cap * part), dtype=cfg.dtype, device=r.world.device)
    opt_store = make(opt_init, 1 - share, "optimizer") if opt_init is not None else None
    return _State(server, make(kept, share, "clients"), opt_store)


def _rows(store):
    """What a checkpoint reads from a store: a plain store's tensors, a paged store itself."""
    return store.tensors if isinstance(store, ClientStore) else store


def _resumed_state(r: Run, path) -> _State:
    s = _fresh_state(r)
    paged = not isinstance(s.store, ClientStore)
    saved = load_checkpoint(path, clients=r.world.clients, device=r.world.device, client_rows=not paged)
    if paged:  # rows stream from the file into the paged stores, a bounded chunk at a time
        restore_rows(path, "clients", s.store, clients=r.world.clients)
        if s.opt_store is not None:
            restore_rows(path, "optimizer", s.opt_store, clients=r.world.clients)
    else:
        _restore(s.store, saved.clients, "client")
        if s.opt_store is not None:
            _restore(s.opt_store, saved.optimizer, "optimizer")
    return _State(saved.server, s.store, s.opt_store, saved.totals, saved.metrics, saved.wall_seconds, saved.round + 1)


def _restore(store: ClientStore, saved: dict[str, torch.Tensor] | None, what: str) -> None:
    """Replace a store's tensors by a checkpoint's rows, refusing a checkpoint of another layout."""
    if saved is None or set(saved) != set(store.tensors) or any(
            saved[k].shape != v.shape for k, v in store.tensors.items()):
        raise CheckpointError(f"checkpoint {what} tensors do not match this run's strategy and model "
                              f"(saved: {sorted(saved or [])}, needed: {sorted(store.tensors)})")
    store.tensors = saved

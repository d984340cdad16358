"""The strategy contract v2 carries a method the v1 contract could not express: a different client
grouping at every layer, and a per-(client, layer) weight that is 0 where the client did not train
that layer. `Layerwise` below is the whole method (about 50 lines); its aggregate is checked
against a float64 Python loop over clients, and it runs end to end through the round loop."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from mpi4py import MPI

from fedhpc.config import ExperimentConfig
from fedhpc.configtree import build
from fedhpc.experiment import run
from fedhpc.models.ranks import ClientRanks
from fedhpc.runtime.reduce import Reduction
from fedhpc.strategies.base import (STRATEGIES, Block, ClientPlan, Exchange, LocalHooks, Population, RoundPlan, Strategy,
                                    StrategyConfig, Task, is_head, is_lora_a, replace_present)


@dataclass(kw_only=True)
class LayerwiseConfig(StrategyConfig):
    pass


class _TrainedLayers(LocalHooks):
    def __init__(self, masks):
        self.masks = masks

    def movable(self, key):
        return self.masks.get(key)


class Layerwise(Strategy):
    """Layer l groups client c as c mod (l + 2); client c trains layer l iff (c + l) is even."""
    Config = LayerwiseConfig

    def __init__(self, cfg, *, shapes, population):
        super().__init__(cfg, shapes=shapes, population=population)
        self.layers = [k[:-len(".lora_A")] for k in self.keys if is_lora_a(k)]
        ids = np.arange(population.size)
        self.groups = {m: ids % (l + 2) for l, m in enumerate(self.layers)}
        self.trains = {m: (ids + l) % 2 == 0 for l, m in enumerate(self.layers)}

    def init_server(self, init, *, frozen):
        out = {k: v.clone() for k, v in init.items() if is_head(k)}
        for l, m in enumerate(self.layers):
            out.update({k: init[k].expand(l + 2, *init[k].shape[1:]).clone() for k in (m + ".lora_A", m + ".lora_B")})
        return out

    def configure_train(self, server, sampled, seen):
        n = self.population.num_examples
        blocks = {"head": Block({k: s for k, s in self.shapes.items() if is_head(k)})}
        for l, m in enumerate(self.layers):
            keys = {k: self.shapes[k] for k in (m + ".lora_A", m + ".lora_B")}
            blocks[m] = Block(keys, groups=self.groups[m], num_groups=l + 2, weights=n * self.trains[m])
        return RoundPlan(sampled, Exchange(blocks, down=dict(self.shapes)))

    def configure_client(self, server, state, clients, task):
        start = self.configure_evaluate(server, state, clients)
        if task != Task.TRAIN:
            return None if task == Task.PROBE else ClientPlan(start, list(self.keys))
        masks = {}
        for m in self.layers:
            trains = torch.as_tensor(self.trains[m][clients])
            masks.update({m + ".lora_A": trains.view(-1, 1, 1), m + ".lora_B": trains.view(-1, 1, 1)})
        return ClientPlan(start, list(self.keys), _TrainedLayers(masks))

    def aggregate_train(self, server, reduced, *, round_index):
        new = dict(server)
        for block in reduced.blocks.values():
            new.update(replace_present(server, block))
        return new

    def configure_evaluate(self, server, state, clients):
        rows = {m: torch.as_tensor(self.groups[m][clients]) for m in self.layers}
        return {k: server[k][rows[k.rsplit(".", 1)[0]]].clone() if not is_head(k)
                else server[k].expand(len(clients), *server[k].shape[1:]).clone() for k in self.keys}

    def global_model(self, server, init):
        return None


def _strategy(num_clients=7):
    shapes = {"blocks.0.qkv.lora_A": (2, 3), "blocks.0.qkv.lora_B": (4, 2),
              "blocks.1.fc1.lora_A": (2, 3), "blocks.1.fc1.lora_B": (5, 2), "head.weight": (3, 4), "head.bias": (3,)}
    n = np.arange(num_clients) + 3.0
    population = Population(num_examples=n, groups=np.zeros(num_clients, dtype=np.int64),
                            ranks=ClientRanks(np.full(num_clients, 2), 4.0))
    return Layerwise(LayerwiseConfig(name="test_layerwise"), shapes=shapes, population=population), shapes, n


def test_aggregate_equals_a_float64_loop_over_clients():
    strategy, shapes, n = _strategy()
    gen = torch.Generator().manual_seed(0)
    init = {k: torch.randn(1, *s, generator=gen) for k, s in shapes.items()}
    server = strategy.init_server(init, frozen={})
    participants = np.array([0, 1, 2, 4, 5, 6])  # client 3 sits the round out
    plan = strategy.configure_train(server, participants, np.arange(7))
    trained = {k: torch.randn(7, *s, generator=gen) for k, s in shapes.items()}
    reduction = Reduction(plan.exchange, n)
    for ids in (participants[:4], participants[4:]):  # two passes
        reduction.add(ids, {k: v[ids] for k, v in trained.items()})
    new = strategy.aggregate_train(server, reduction.finish(comm=MPI.COMM_SELF)[0], round_index=1)

    for key in shapes:
        layer = key.rsplit(".", 1)[0]
        groups = strategy.groups[layer] if not is_head(key) else np.zeros(7, dtype=np.int64)
        trains = strategy.trains[layer] if not is_head(key) else np.ones(7, dtype=bool)
        for g in range(server[key].shape[0]):
            total, weight = torch.zeros(shapes[key], dtype=torch.float64), 0.0
            for c in participants:
                if groups[c] == g and trains[c]:
                    total += n[c] * trained[key][c].double()
                    weight += n[c]
            expected = server[key][g] if weight == 0 else (total / weight).float()
            torch.testing.assert_close(new[key][g], expected, rtol=0, atol=1e-6, msg=f"{key} group {g}")
    # the grouping really differs per layer and some groups are left untouched this round
    assert not np.array_equal(strategy.groups["blocks.0.qkv"], strategy.groups["blocks.1.fc1"])
    assert torch.equal(new["blocks.1.fc1.lora_A"][0], server["blocks.1.fc1.lora_A"][0])


def test_a_client_uploads_only_the_layers_it_trained():
    from fedhpc.runtime.exchange import modelled_bytes

    strategy, shapes, n = _strategy()
    plan = strategy.configure_train({}, np.array([0, 1]), np.arange(7))
    up, _ = modelled_bytes(plan.exchange, plan.participants, np.full(7, 2), n)
    head = (3 * 4 + 3) * 4
    qkv, fc1 = (2 * 3 + 4 * 2) * 4, (2 * 3 + 5 * 2) * 4
    assert up == (head + qkv) + (head + fc1)  # client 0 trains layer 0, client 1 layer 1


@pytest.fixture
def registered():
    """`strategy.name: test_layerwise` for this test only (other tests list every registered method)."""
    STRATEGIES["test_layerwise"] = Layerwise
    yield
    del STRATEGIES["test_layerwise"]


def test_layerwise_runs_end_to_end_and_untrained_layers_do_not_move(tmp_path, registered):
    from fedhpc.assemble import assemble
    from fedhpc.clients import train_pass

    cfg = build(ExperimentConfig, {
        "name": "layerwise", "seed": 0, "rounds": 2, "num_clients": 6, "out_dir": str(tmp_path),
        "data": {"name": "planted", "planted": {"num_clusters": 2, "num_classes": 4, "samples_per_client": 24}},
        "model": {"family": "timm", "name": "vit_tiny_patch16_224",
                  "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}},
        "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["qkv"]},
        "train": {"batch_size": 8, "clients_per_pass": 4, "optimizer": {"name": "adamw", "lr": 0.01,
                                                                         "weight_decay": 0.1}},
        "strategy": {"name": "test_layerwise"}})
    r = assemble(cfg, MPI.COMM_SELF)
    server = r.strategy.init_server(r.init, frozen=r.model.frozen_weights())
    ids = np.array([0, 1, 2, 3])
    plan = r.strategy.configure_client(server, {}, ids, Task.TRAIN)
    start = {k: v.clone() for k, v in plan.start.items()}
    train_pass(r, plan, ids, task=Task.TRAIN, round_index=1)
    for layer in r.strategy.layers:
        for key in (layer + ".lora_A", layer + ".lora_B"):
            moved = (plan.start[key] != start[key]).flatten(1).any(1).numpy()
            np.testing.assert_array_equal(moved, r.strategy.trains[layer][ids], err_msg=key)  # decay included

    summary = run(cfg, comm=MPI.COMM_WORLD, progress=False)
    assert np.isfinite(summary["personalized_mean"])
    rounds = [json.loads(line) for line in (tmp_path / "layerwise" / "metrics.jsonl").read_text().splitlines()]
    assert len(rounds) == 2 and rounds[-1]["bytes_up"] > 0


class _SGDWithNorms:
    """Plain SGD whose state is not parameter-shaped: one running ‖g‖² per client and key."""

    def __init__(self, lr):
        self.lr = lr

    def init_state(self, params):
        count = next(iter(params.values())).shape[0]
        return {"step": torch.zeros(count, dtype=torch.int64), **{k + ".grad_sq": torch.zeros(count) for k in params}}

    def step(self, params, grads, state, active=None, lr_scale=1.0, movable=None):
        state["step"] += 1
        for key, g in grads.items():
            state[key + ".grad_sq"] += g.flatten(1).square().sum(1)
            params[key].sub_(g * (self.lr * lr_scale))


def test_a_plan_brings_its_own_optimizer_and_state_layout(tmp_path):
    """The plan's optimizer replaces the config's; its [C]-shaped state comes back from training."""
    from fedhpc.assemble import assemble
    from fedhpc.clients import train_pass
    from fedhpc.train.optim import OptimConfig, StackedOptimizer

    cfg = build(ExperimentConfig, {
        "name": "own_optimizer", "num_clients": 4, "out_dir": str(tmp_path),
        "data": {"name": "planted", "planted": {"num_clusters": 2, "num_classes": 4, "samples_per_client": 24}},
        "model": {"kwargs": {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2}},
        "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["qkv"]}, "train": {"batch_size": 8}})
    r = assemble(cfg, MPI.COMM_SELF)
    ids = np.arange(4)
    server = r.strategy.init_server(r.init, frozen={})
    ours = r.strategy.configure_client(server, {}, ids, Task.TRAIN)
    ours.optimizer = _SGDWithNorms(lr=0.05)
    theirs = r.strategy.configure_client(server, {}, ids, Task.TRAIN)
    theirs.optimizer = StackedOptimizer(OptimConfig(name="sgd", lr=0.05))
    _, state = train_pass(r, ours, ids, task=Task.TRAIN, round_index=1)
    train_pass(r, theirs, ids, task=Task.TRAIN, round_index=1)
    for key in r.model.shapes:  # the same SGD trajectory, bit for bit
        assert torch.equal(ours.start[key], theirs.start[key]), key
    assert state["step"].tolist() == [3, 3, 3, 3]  # every client has 3 batches of at most 8
    assert all(state[k + ".grad_sq"].shape == (4,) and bool((state[k + ".grad_sq"] > 0).all()) for k in r.model.shapes)

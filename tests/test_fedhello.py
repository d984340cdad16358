"""Fed-HeLLo, FedRA and Exclusive (layer allocation) against independent references: each allocation
rule against its written definition, the proxy-set Fisher scores against a per-sample float64
autograd loop, the masked aggregation against a Python loop over clients, bytes counted by hand,
FedIT as the all-layers special case, 1 / 2 / 4 ranks, and resume across a FIM round."""
from __future__ import annotations

import copy
import itertools
import json
import shutil

import numpy as np
import pytest
import torch
from mpi4py import MPI

from conftest import REPO, TINY, mpiexec
from fedhpc.config import load_config
from fedhpc.configtree import ConfigError, build
from fedhpc.experiment import run
from fedhpc.models.backbone import build_cohort_model
from fedhpc.models.config import LoraConfig, ModelConfig
from fedhpc.models.ranks import ClientRanks
from fedhpc.runtime.exchange import modelled_bytes
from fedhpc.runtime.reduce import Reduction
from fedhpc.strategies import Population, StrategyConfig, build_strategy
from fedhpc.strategies.layer_allocation import (FIM_LEVELS, deterministic_layers, fim_probabilities, geometric_prior,
                                                resource_groups)
from fedhpc.train.plan import Task
from fedhpc.train.scoring import proxy_scores
from test_experiment import _close

CONFIG = str(REPO / "configs/quickstart.yaml")
DEPTH3 = "model.kwargs={img_size: 16, patch_size: 4, depth: 3, embed_dim: 32, num_heads: 2}"
# three blocks, two adapted modules each; budgets 1 / 2 / 3 layers
SHAPES = {f"blocks.{b}.{m}.{f}": s for b in range(3) for m, d in (("attn.qkv", 6), ("mlp.fc1", 5))
          for f, s in (("lora_A", (2, 4)), ("lora_B", (d, 2)))}
SHAPES.update({"head.weight": (3, 4), "head.bias": (3,)})


def _strategy(name="fedhello", num_clients=9, num_examples=None, **options):
    n = np.arange(num_clients) + 3.0 if num_examples is None else np.asarray(num_examples, dtype=np.float64)
    options.setdefault("groups", {"budgets": [1, 2, 3]})
    cfg = build(StrategyConfig, {"name": name, **options})
    population = Population(num_examples=n, groups=np.zeros(num_clients, dtype=np.int64),
                            ranks=ClientRanks(np.full(num_clients, 2), 4.0), seed=7)
    return build_strategy(cfg, shapes=SHAPES, population=population)


# --- allocation rules against their definitions ---------------------------------------------------
def test_resource_groups_sizes_presets_and_seeding():
    for n, fractions, sizes in ((9, [1, 1, 1], [3, 3, 3]), (10, [6, 3, 1], [6, 3, 1]), (11, [1, 1, 1], [4, 4, 3]),
                                (7, [6, 3, 1], [4, 2, 1])):
        groups = resource_groups(n, fractions, seed=0)
        assert np.bincount(groups, minlength=3).tolist() == sizes, (n, fractions)
    a, b = resource_groups(30, [1, 1, 1], seed=0), resource_groups(30, [1, 1, 1], seed=1)
    assert np.array_equal(a, resource_groups(30, [1, 1, 1], seed=0)) and not np.array_equal(a, b)
    s = _strategy(groups={"preset": "6-3-1", "budgets": [1, 2, 3]}, num_clients=10)
    assert np.bincount(s.group).tolist() == [6, 3, 1] and s.budget.tolist() == [[1, 2, 3][g] for g in s.group]
    # default budgets: ⌈L/2⌉, ⌈3L/4⌉, L (the official 6 / 9 / 12 of 12)
    assert sorted(set(_strategy(groups={}).budget.tolist())) == [2, 3]  # L = 3: 2, 3, 3


def test_geometric_priors_are_the_spec_vectors():
    np.testing.assert_allclose(geometric_prior("bottleneck", 12) * 27, [3, 3, 3, 2, 2, 1, 1, 1, 2, 3, 3, 3])
    np.testing.assert_allclose(geometric_prior("triangle", 12) * 24, [3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1])
    np.testing.assert_allclose(geometric_prior("inverted_triangle", 12) * 24, [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3])
    np.testing.assert_allclose(geometric_prior("uniform", 12), np.full(12, 1 / 12))
    for L in (1, 2, 6, 7, 24):
        for pattern in ("bottleneck", "triangle", "inverted_triangle", "uniform"):
            p = geometric_prior(pattern, L)
            assert p.shape == (L,) and abs(p.sum() - 1) < 1e-12 and (p > 0).all()
    np.testing.assert_allclose(geometric_prior("bottleneck", 24) * 54, np.repeat([3, 3, 3, 2, 2, 1, 1, 1, 2, 3, 3, 3], 2))


def test_fixed_layer_sets_follow_their_definition():
    for L, n in itertools.product((6, 7, 12), range(1, 13)):
        if n > L:
            continue
        assert deterministic_layers("triangle", n, L, 0).tolist() == list(range(n))
        assert deterministic_layers("inverted_triangle", n, L, 0).tolist() == list(range(L - n, L))
        bottleneck = deterministic_layers("bottleneck", n, L, 0).tolist()
        assert bottleneck == list(range(-(-n // 2))) + list(range(L - n // 2, L))
        cover = np.zeros(L, dtype=np.int64)
        for client in range(L):  # L clients with rotating offsets cover every layer n times
            layers = deterministic_layers("uniform", n, L, client)
            assert len(set(layers.tolist())) == n and list(layers) == sorted(layers)
            cover[layers] += 1
        assert (cover == n).all(), (L, n)


def test_random_draws_respect_budgets_are_keyed_and_rank_independent():
    s = _strategy(allocation="random", pattern="triangle", num_clients=9)
    server = s.init_server({k: torch.zeros(1, *v) for k, v in SHAPES.items()}, frozen={})
    everyone = np.arange(9)
    mask = s.layer_mask(server, everyone, 4)
    assert mask.sum(1).tolist() == s.budget.tolist()
    for c in everyone:  # the definition: numpy's choice on the client's own (seed, round, client) stream
        rng = np.random.default_rng([7, 4, int(c), 5])
        expected = np.sort(rng.choice(3, size=int(s.budget[c]), replace=False, p=geometric_prior("triangle", 3)))
        assert np.flatnonzero(mask[c]).tolist() == expected.tolist()
    # any split of the clients (ranks, passes, a lone client run twice) draws the same sets
    parts = np.concatenate([s.layer_mask(server, ids, 4) for ids in (everyone[:2], everyone[2:7], everyone[7:])])
    assert np.array_equal(parts, mask)
    assert np.array_equal(s.layer_mask(server, np.array([5, 5]), 4), mask[[5, 5]])
    assert not all(np.array_equal(s.layer_mask(server, everyone, t), mask) for t in (5, 6, 7))  # rounds differ


def test_budget_one_draws_follow_the_prior():
    s = _strategy(allocation="random", pattern="bottleneck", groups={"fractions": [1], "budgets": [1]})
    server = s.init_server({k: torch.zeros(1, *v) for k, v in SHAPES.items()}, frozen={})
    counts = sum(s.layer_mask(server, np.arange(9), t).sum(0) for t in range(1, 801))
    np.testing.assert_allclose(counts / counts.sum(), geometric_prior("bottleneck", 3), atol=0.02)


def _kmeans_brute_force(values: np.ndarray, k: int) -> np.ndarray:
    """Optimal 1-D k-means by trying every split of the sorted values into k runs: `[L]` cluster rank."""
    order = np.argsort(values, kind="stable")
    v = values[order]
    best, labels = np.inf, None
    for cuts in itertools.combinations(range(1, len(v)), k - 1):
        parts = np.split(v, cuts)
        cost = sum(((p - p.mean()) ** 2).sum() for p in parts)
        if cost < best - 1e-12:
            best, labels = cost, np.concatenate([np.full(len(p), j) for j, p in enumerate(parts)])
    out = np.empty(len(values), dtype=np.int64)
    out[order] = labels
    return out


def test_fim_probabilities_are_sorted_kmeans_levels():
    rng = np.random.default_rng(0)
    for trial in range(20):
        scores = np.concatenate([rng.normal(m, 0.3, size=s) for m, s in zip(rng.uniform(0, 10, 3), (4, 4, 4))])
        p = fim_probabilities(scores, seed=trial)
        rank = _kmeans_brute_force(scores, 3)
        expected = np.asarray(FIM_LEVELS)[rank]
        np.testing.assert_allclose(p, expected / expected.sum(), rtol=1e-12)
        raw = fim_probabilities(scores, sort_clusters=False, seed=trial)  # same clusters, KMeans' level order
        orders = [np.asarray(FIM_LEVELS)[list(perm)][rank] for perm in itertools.permutations(range(3))]
        assert any(np.allclose(raw, q / q.sum(), rtol=1e-12) for q in orders)
    np.testing.assert_allclose(fim_probabilities(np.array([1.0, 5.0, 5.0])), np.array([2, 3, 3]) / 8)  # 2 clusters


@pytest.mark.parametrize("persist", [True, False])
def test_fim_probabilities_apply_in_their_round_and_with_persist_after_it(persist):
    s = _strategy(allocation="fim", pattern="triangle", persist=persist, fim_start=6, fim_every=5)
    server = s.init_server({k: torch.zeros(1, *v) for k, v in SHAPES.items()}, frozen={})
    prior = geometric_prior("triangle", 3)
    assert [s.is_fim_round(t) for t in range(1, 17)] == [t in (6, 11, 16) for t in range(1, 17)]
    np.testing.assert_array_equal(s.probabilities(server, 6), prior)  # no scores yet
    server = {**server, "fedhello.fim_probs": torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64),
              "fedhello.fim_round": torch.tensor([6])}
    np.testing.assert_array_equal(s.probabilities(server, 6), [0.2, 0.2, 0.6])
    np.testing.assert_array_equal(s.probabilities(server, 7), [0.2, 0.2, 0.6] if persist else prior)


# --- aggregation and bytes ------------------------------------------------------------------------
def _aggregate(s, server, participants, trained, passes):
    plan = s.configure_train(server, participants, np.arange(s.population.size))
    reduction = Reduction(plan.exchange, s.population.num_examples)
    for ids in passes:
        reduction.add(ids, {k: trained[k][ids] for k in plan.exchange.keys_up()})
    return plan, s.aggregate_train(server, reduction.finish(comm=MPI.COMM_SELF)[0], round_index=1)


@pytest.mark.parametrize("weights,aggregate_head", [("uniform", False), ("num_examples", True)])
def test_masked_aggregation_equals_a_python_loop(weights, aggregate_head):
    s = _strategy(allocation="random", weights=weights, aggregate_head=aggregate_head)
    g = torch.Generator().manual_seed(0)
    server = s.init_server({k: torch.randn(1, *v, generator=g) for k, v in SHAPES.items()}, frozen={})
    trained = {k: torch.randn(9, *v, generator=g) for k, v in SHAPES.items()}
    participants = np.array([0, 2, 3, 5, 6, 8])
    plan, new = _aggregate(s, server, participants, trained, (participants[:4], participants[4:]))
    mask = s.layer_mask(server, np.arange(9), 1)
    n = s.population.num_examples
    for key in SHAPES:
        layer = None if key.startswith("head") else int(key.split(".")[1])
        total, weight = torch.zeros(SHAPES[key], dtype=torch.float64), 0.0
        for c in participants:
            trains = aggregate_head if layer is None else mask[c, layer]
            if trains:
                w = 1.0 if weights == "uniform" else n[c]
                total += w * trained[key][c].double()
                weight += w
        expected = server[key][0] if weight == 0 else (total / weight).float()
        torch.testing.assert_close(new[key][0], expected, rtol=0, atol=1e-6, msg=key)
    # budget 1 clients leave two layers to others: some layer was trained by some and not all
    assert 0 < mask[participants].sum() < mask[participants].size


def test_untrained_layers_keep_their_value():
    s = _strategy(allocation="fixed", pattern="triangle", groups={"fractions": [1], "budgets": [1]})
    g = torch.Generator().manual_seed(1)
    server = s.init_server({k: torch.randn(1, *v, generator=g) for k, v in SHAPES.items()}, frozen={})
    trained = {k: torch.randn(9, *v, generator=g) for k, v in SHAPES.items()}
    _, new = _aggregate(s, server, np.arange(9), trained, (np.arange(9),))
    for key in SHAPES:  # triangle, budget 1: block 0 only; the head is not aggregated by default
        same = torch.equal(new[key], server[key])
        assert same == (not key.startswith("blocks.0.")), key


def test_bytes_count_only_trained_layers_by_hand():
    s = _strategy(allocation="fixed", pattern="inverted_triangle", aggregate_head=True)
    plan = s.configure_train(s.init_server({k: torch.zeros(1, *v) for k, v in SHAPES.items()}, frozen={}),
                             np.arange(9), np.arange(9))
    up, down = modelled_bytes(plan.exchange, plan.participants, np.full(9, 2), s.population.num_examples)
    block = (2 * 4 + 6 * 2) + (2 * 4 + 5 * 2)   # qkv A + B, fc1 A + B of one block: 38 floats
    head = 3 * 4 + 3
    sizes = np.bincount(s.group, minlength=3)   # clients with budgets 1, 2, 3
    assert up == 4 * int(sizes @ np.array([1 * block + head, 2 * block + head, 3 * block + head]))
    assert down == 4 * 9 * (3 * block + head)   # everyone receives every layer
    s = _strategy("exclusive", aggregate_head=True)
    plan = s.configure_train(s.init_server({k: torch.zeros(1, *v) for k, v in SHAPES.items()}, frozen={}),
                             np.arange(9), np.arange(9))
    up, _ = modelled_bytes(plan.exchange, plan.participants, np.full(9, 2), s.population.num_examples)
    assert up == 4 * int((s.budget == 3).sum()) * (3 * block + head)  # only full-budget clients send


# --- Fisher scores on the proxy set ---------------------------------------------------------------
def _fisher_loop(model, adapters, x, y, indices, keys, target):
    """Per-sample float64 autograd loop: F_θ = mean_i (∂ f(x_i) / ∂θ)², entry by entry."""
    model = copy.deepcopy(model).double()
    own = {k: v.double().clone() for k, v in adapters.items()}
    fisher = {k: torch.zeros_like(own[k][0]) for k in keys}
    for i in indices:
        live = {k: v.clone().requires_grad_(k in keys) for k, v in own.items()}
        out = model(x[i:i + 1].double(), live)
        if target == "log_prob":
            out = out.log_softmax(-1)
        for k, grad in zip(keys, torch.autograd.grad(out[0, y[i]], [live[k] for k in keys])):
            fisher[k] += grad[0].square()
    return {k: v / len(indices) for k, v in fisher.items()}


@pytest.mark.parametrize("target,norm", [("logit", "frobenius"), ("log_prob", "frobenius"), ("logit", "trace")])
def test_layer_fisher_scores_match_a_per_sample_float64_loop(target, norm):
    torch.manual_seed(0)
    model = build_cohort_model(ModelConfig(name="vit_tiny_patch16_224", kwargs=dict(
        img_size=16, patch_size=8, depth=3, embed_dim=16, num_heads=2)),
        LoraConfig(r=2, lora_alpha=4, target_modules=["qkv", "fc1"]), num_classes=3, seed=0)
    g = torch.Generator().manual_seed(1)
    adapters = {k: torch.randn(1, *s, generator=g) * 0.3 for k, s in model.shapes.items()}
    x, y = torch.randn(12, 3, 16, 16, generator=g), torch.randint(0, 3, (12,), generator=g)
    proxy = np.array([0, 2, 3, 5, 8, 9, 11])
    population = Population(num_examples=np.ones(4), groups=np.zeros(4, dtype=np.int64),
                            ranks=ClientRanks(np.full(4, 2), 4.0))
    s = build_strategy(build(StrategyConfig, {"name": "fedhello", "fim_target": target, "fim_norm": norm}),
                       shapes=dict(model.shapes), population=population)
    request = s.configure_score(s.init_server(adapters, frozen={}), round_index=s.cfg.fim_start)
    assert request is not None and s.configure_score(s.init_server(adapters, frozen={}), round_index=2) is None
    got = s.layer_scores(proxy_scores(model, request.adapters, x=x, y=y, indices=proxy, keys=request.keys,
                                      target=request.target, entries=request.entries, chunk=3))
    fisher = _fisher_loop(model, adapters, x, y, proxy, request.keys, target)
    expected = [sum(float(fisher[k].norm() if norm == "frobenius" else fisher[k].sum()) for k in keys)
                for keys in s.layer_keys]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)
    assert [len(k) for k in s.layer_keys] == [4, 4, 4]


# --- end to end -------------------------------------------------------------------------------------
def _cfg(tmp_path, *extra):
    return load_config(CONFIG, TINY + [DEPTH3, f"out_dir={tmp_path}", *extra])


FIM = ["strategy.name=fedhello", "strategy.fim_samples=20", "strategy.fim_start=2", "strategy.fim_every=1"]


def test_proxy_set_leaves_training_and_other_methods_keep_their_data(tmp_path):
    from fedhpc.assemble import assemble

    fim = assemble(_cfg(tmp_path, *FIM), MPI.COMM_SELF)
    plain = assemble(_cfg(tmp_path, "strategy.name=fedhello", "strategy.allocation=random"), MPI.COMM_SELF)
    fedit = assemble(_cfg(tmp_path, "strategy.name=fedit"), MPI.COMM_SELF)
    assert len(plain.proxy) == len(fedit.proxy) == 0 and len(fim.proxy) == 20
    for a, b in zip(plain.data.client_train, fedit.data.client_train):
        assert np.array_equal(a, b)
    assert torch.equal(plain.data.train_y, fedit.data.train_y) and torch.equal(fim.data.train_y, fedit.data.train_y)
    seen_pool = np.concatenate([fedit.data.client_train[c] for c in fedit.data.seen])
    assert np.isin(fim.proxy, seen_pool).all() and len(np.unique(fim.proxy)) == 20
    classes = np.unique(fedit.data.train_y[seen_pool].numpy())
    assert set(classes) <= set(fedit.data.train_y[fim.proxy].numpy())  # at least one sample of every class
    for c, (a, b) in enumerate(zip(fim.data.client_train, fedit.data.client_train)):
        assert np.array_equal(a, b[~np.isin(b, fim.proxy)]), c
    with pytest.raises(ValueError, match="strategy.fim_samples"):
        assemble(_cfg(tmp_path, "strategy.name=fedhello", "strategy.fim_samples=500"), MPI.COMM_SELF)


def test_fim_round_scores_the_global_model_on_the_proxy_set(tmp_path):
    """The scores the round loop hands the strategy are those of the global model at the start of the
    FIM round (the round-1 checkpoint), by the float64 loop above, on `Run.proxy`."""
    from fedhpc.assemble import assemble
    from fedhpc.io.checkpoint import load

    cfg = _cfg(tmp_path, *FIM, "rounds=2", "strategy.persist=false")
    summary = run(cfg, comm=MPI.COMM_SELF, progress=False)
    r = assemble(cfg, MPI.COMM_SELF)
    saved = load(tmp_path / "quickstart/checkpoints/round-000001.h5", clients=r.world.clients, device="cpu")
    adapters = {k: saved.server[k] for k in r.strategy.keys}
    keys = [k for keys in r.strategy.layer_keys for k in keys]
    fisher = _fisher_loop(r.model, adapters, r.data.train_x, r.data.train_y, r.proxy, keys, "logit")
    expected = [sum(float(fisher[k].norm()) for k in keys) for keys in r.strategy.layer_keys]
    assert summary["fim_round"] == 2
    np.testing.assert_allclose(summary["fim_scores"], expected, rtol=1e-4)
    assert sorted(np.round(np.array(summary["fim_probs"]) * sum(FIM_LEVELS), 12).tolist()) == sorted(
        np.round(np.asarray(FIM_LEVELS), 12).tolist())  # three distinct scores, three levels


def test_untrained_layers_do_not_move_in_local_training(tmp_path):
    from fedhpc.assemble import assemble
    from fedhpc.clients import train_pass

    r = assemble(_cfg(tmp_path, "strategy.name=fedra", "train.optimizer.weight_decay=0.1"), MPI.COMM_SELF)
    server = r.strategy.init_server(r.init, frozen={})
    ids = np.array([0, 1, 2, 3])
    plan = r.strategy.configure_client(server, {}, ids, Task.TRAIN)
    start = {k: v.clone() for k, v in plan.start.items()}
    train_pass(r, plan, ids, task=Task.TRAIN, round_index=1)
    mask = r.strategy.layer_mask(server, ids, 1)
    assert mask.sum(1).tolist() == r.strategy.budget[ids].tolist() and not mask.all()
    for l, keys in enumerate(r.strategy.layer_keys):
        for key in keys:
            moved = (plan.start[key] != start[key]).flatten(1).any(1).numpy()
            np.testing.assert_array_equal(moved, mask[:, l], err_msg=key)  # weight decay included


def _summary(tmp_path, name, *extra):
    """Every summary field but the method's name, the wall clock and the MPI bytes (one weight column
    per layer block: Fed-HeLLo's Allreduce carries L + 1 of them, FedIT's one)."""
    run(_cfg(tmp_path / name, *extra), comm=MPI.COMM_SELF, progress=False)
    summary = json.loads((tmp_path / name / "quickstart/summary.json").read_text())
    return {k: v for k, v in summary.items() if k not in ("strategy", "wall_seconds", "mpi_bytes")}


@pytest.mark.parametrize("weights,uneven", [("uniform", False), ("num_examples", True)])
def test_every_budget_all_layers_is_fedit(tmp_path, weights, uneven):
    """Planted clients hold equal sample counts (uniform weights are FedIT's); digits split by
    Dirichlet(0.5) do not (sample-count weights are)."""
    extra = ["data.name=digits", "data.max_samples=400"] if uneven else []
    every = ["strategy.groups.fractions=[1]", "strategy.groups.budgets=[3]", "strategy.aggregate_head=true",
             f"strategy.weights={weights}"]
    fedit = _summary(tmp_path, "fedit", "strategy.name=fedit", *extra)
    for allocation in ("random", "fixed"):
        ours = _summary(tmp_path, allocation, "strategy.name=fedhello", f"strategy.allocation={allocation}",
                        *every, *extra)
        assert ours == fedit, allocation


def test_fedra_is_fedhello_with_uniform_random_draws(tmp_path):
    fedra = _summary(tmp_path, "fedra", "strategy.name=fedra")
    ours = _summary(tmp_path, "ours", "strategy.name=fedhello", "strategy.allocation=random",
                    "strategy.pattern=uniform")
    assert ours == fedra


def test_bad_budgets_are_one_line_errors():
    with pytest.raises(ValueError, match="only 3 blocks"):
        _strategy(groups={"budgets": [1, 2, 4]})
    with pytest.raises(ValueError, match="exclusive needs a group"):
        _strategy("exclusive", groups={"budgets": [1, 2, 2]})
    with pytest.raises(ConfigError, match="one budget per group"):
        _strategy(groups={"fractions": [1, 1], "budgets": [1, 2, 3]})


@pytest.mark.slow  # ~3 minutes on the shared 2-core machine
def test_one_two_and_four_ranks_give_the_same_summary(tmp_path):
    summaries = {}
    for n in (1, 2, 4):
        proc = mpiexec(n, ["run", CONFIG, *TINY, DEPTH3, f"out_dir={tmp_path / f'n{n}'}", *FIM, "rounds=3",
                           "strategy.persist=false", "sampling.fraction=0.7", "train.clients_per_pass=2", "--quiet"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        summaries[n] = json.loads((tmp_path / f"n{n}" / "quickstart" / "summary.json").read_text())
    assert summaries[1]["fim_round"] == 3
    _close(summaries[1], summaries[2])
    _close(summaries[1], summaries[4])


def test_resume_across_a_fim_round_is_identical(tmp_path):
    from fedhpc.io.checkpoint import find_resumable
    from test_checkpoint import _assert_same_run

    overrides = [*FIM, "rounds=3", "strategy.fim_every=2", "checkpoint.keep=3", "strategy.keep_optimizer_state=true"]
    run(_cfg(tmp_path / "a", *overrides), comm=MPI.COMM_SELF, progress=False)
    full, part = tmp_path / "a/quickstart", tmp_path / "b/quickstart"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints/round-000001.h5", part / "checkpoints")
    shutil.copy(full / "config.yaml", part)
    run(_cfg(tmp_path / "b", *overrides), comm=MPI.COMM_SELF, progress=False,
        resume=find_resumable(part, comm=MPI.COMM_SELF))
    _assert_same_run(part, full)
    assert json.loads((full / "summary.json").read_text())["fim_round"] == 2

"""FedTreeLoRA (strategies/fedtreelora.py, strategies/tree_cuts.py) against independent references:
the cut rule against a brute-force search over cut sequences (scipy's fcluster and a numpy
silhouette), nested cuts, the λ gradient against autograd through dense float64 per-client
weights, the per-layer-group reduction and external experts against a float64 loop over clients,
1 / 2 / 4 ranks, resume after the tree is built, and peft loading a client's rank-2r export."""
import itertools
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

from conftest import REPO, TINY, mpiexec
from fedhpc.cli import main
from fedhpc.config import load_config
from fedhpc.configtree import ConfigError, build
from fedhpc.experiment import run
from fedhpc.models.backbone import build_backbone, build_cohort_model
from fedhpc.models.cohort import lora_keys, mixture_keys
from fedhpc.models.config import LoraConfig, ModelConfig
from fedhpc.models.ranks import ClientRanks
from fedhpc.runtime.exchange import modelled_bytes
from fedhpc.runtime.reduce import Reduction
from fedhpc.strategies import Population, StrategyConfig, build_strategy
from fedhpc.strategies.fedtreelora import HEAD, WARMUP, layer_block
from fedhpc.strategies.tree_cuts import (build_tree, fixed_cuts, independent_cuts, layer_distances, tree_cuts,
                                         tree_partition)
from fedhpc.train.plan import Task
from test_experiment import _close

CONFIG = str(REPO / "configs/quickstart.yaml")
FTL = ["strategy.name=fedtreelora", "strategy.warmup_rounds=1"]


# --- the cut rule -----------------------------------------------------------------------------
def _silhouette(d: np.ndarray, labels: np.ndarray) -> float:
    """Mean over samples of (b − a) / max(a, b) (0 for a sample alone in its cluster), in numpy."""
    values = []
    for i in range(len(labels)):
        own = labels == labels[i]
        if own.sum() == 1:
            values.append(0.0)
            continue
        a = d[i, own].sum() / (own.sum() - 1)
        b = min(d[i, labels == g].mean() for g in np.unique(labels) if g != labels[i])
        values.append((b - a) / max(a, b))
    return float(np.mean(values))


def _structured_layers(rng, n, num_layers, noise=0.3):
    """Layer distance matrices of points whose clusters refine with depth (1, 2, 3, ... groups)."""
    layers = []
    for l in range(num_layers):
        groups = np.arange(n) % (l + 1)
        x = rng.standard_normal((l + 1, 3))[groups] + noise * rng.standard_normal((n, 3))
        layers.append(layer_distances(torch.as_tensor(x)))
    return layers


@pytest.mark.parametrize("seed,tau", [(0, 0.1), (1, 0.1), (2, 0.3), (3, -1.0), (4, 0.6)])
def test_cut_rule_equals_a_brute_force_search(seed, tau):
    """Among all cut sequences in [1, N−1]^L, exactly one satisfies the rule (c_0 = 1; each c_l is in
    the window [c_{l−1}, min(N, c_{l−1} + K)) and maximises φ there); it is the one found."""
    from scipy.cluster.hierarchy import fcluster

    rng = np.random.default_rng(seed)
    n, num_layers, window = 7, 4, 3
    layers = _structured_layers(rng, n, num_layers)
    tree, cuts = tree_cuts(layers, window=window, tau=tau)

    def phi(l, c):
        if c == 1:
            return tau
        labels = fcluster(tree, t=c, criterion="maxclust")
        assert len(set(labels)) == c  # no ties in random data
        return _silhouette(layers[l], labels)

    scores = {(l, c): phi(l, c) for l in range(num_layers) for c in range(1, n)}
    valid = []
    for seq in itertools.product(range(1, n), repeat=num_layers):
        previous, ok = 1, True
        for l, c in enumerate(seq):
            candidates = range(previous, min(n, previous + window))
            if c not in candidates or any(scores[l, o] > scores[l, c] for o in candidates if o < c) or \
                    any(scores[l, o] >= scores[l, c] + 1e-12 for o in candidates if o > c):
                ok = False
                break
            previous = c
        if ok:
            valid.append(seq)
    assert valid == [tuple(cuts.counts)]
    for l, c in enumerate(cuts.counts):
        assert len(np.unique(cuts.labels[l])) == c
        assert cuts.scores[l] == pytest.approx(scores[l, c], abs=1e-12)


def test_tree_partitions_are_fclusters_and_nested():
    from scipy.cluster.hierarchy import fcluster
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(5)
    for method in ("average", "single", "complete", "ward"):
        tree = build_tree(layer_distances(torch.as_tensor(rng.standard_normal((9, 4)))), method)
        previous = np.zeros(9, dtype=np.int64)
        for c in range(1, 10):
            labels = tree_partition(tree, 9, c)
            assert len(np.unique(labels)) == c
            assert adjusted_rand_score(fcluster(tree, t=c, criterion="maxclust"), labels) == pytest.approx(1.0)
            for g in np.unique(labels):  # every cluster at c sits inside one cluster at c − 1
                assert len(np.unique(previous[labels == g])) == 1
            previous = labels


def test_cuts_recover_a_depth_profile_and_are_nested():
    """Layers with 1, 1, 2, 2, 4 true groups (4 nested in 2) in 40 dimensions (in a few, noise
    alone can score a silhouette above τ = 0.1): the cuts find them exactly."""
    rng = np.random.default_rng(0)
    n, profile = 12, [1, 1, 2, 2, 4]
    fine = np.arange(n) % 4
    layers = []
    for g in profile:
        group = fine // (4 // g)
        centres = rng.standard_normal((g, 40)) * (1.0 if g > 1 else 0.0)
        layers.append(layer_distances(torch.as_tensor(centres[group] + 0.2 * rng.standard_normal((n, 40)))))
    _, cuts = tree_cuts(layers)
    assert list(cuts.counts) == profile
    for l, g in enumerate(profile):
        truth = fine // (4 // g)
        assert all(len(np.unique(cuts.labels[l][truth == t])) == 1 for t in range(g))
    for shallow, deep in zip(cuts.labels[:-1], cuts.labels[1:]):
        assert all(len(np.unique(shallow[deep == g])) == 1 for g in np.unique(deep))
    fixed = fixed_cuts(build_tree(sum(layers) / len(layers)), n, len(layers), 4)
    assert list(fixed.counts) == [4] * 5 and (fixed.labels == fixed.labels[0]).all()
    # each layer's own tree finds the structured layers too, but splits an outlier off a noise layer
    # (its own tree fits the noise: silhouette 0.101 > τ), a partition the next layer's does not refine
    independent = independent_cuts(layers)
    assert list(independent.counts) == [1, 2, 2, 2, 4]
    assert all(np.array_equal(independent.labels[l], cuts.labels[l]) for l in (2, 3, 4))
    assert any(len(np.unique(independent.labels[1][independent.labels[2] == g])) > 1 for g in range(2))


# --- a strategy on small shapes -----------------------------------------------------------------
MODULES = ["blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.qkv", "blocks.2.mlp.fc1"]
R = 2


def _shapes():
    shapes = {}
    for i, m in enumerate(MODULES):
        shapes[f"{m}.lora_A"], shapes[f"{m}.lora_B"] = (R, 5 + i), (4 + i, R)
    return {**shapes, "head.weight": (3, 4), "head.bias": (3,)}


def _strategy(n=9, **options):
    population = Population(num_examples=np.arange(n) % 4 + 2.0, groups=np.arange(n) % 3,
                            ranks=ClientRanks(np.full(n, R), 4.0))
    cfg = build(StrategyConfig, {"name": "fedtreelora", "warmup_rounds": 1, **options})
    return build_strategy(cfg, shapes=_shapes(), population=population)


def _rows(ids, shapes, seed, groups=None):
    """Uploads that depend on the client id only; B carries the client's group at its block
    (`groups`: one array for every block, or a dict by block index), a tree to find."""
    out = {}
    for key, shape in shapes.items():
        rows = []
        for c in ids:
            g = torch.Generator().manual_seed(seed * 1000 + int(c))
            t = torch.randn(*shape, generator=g)
            if groups is not None and key.endswith("lora_B"):
                group = (groups[int(key.split(".")[1])] if isinstance(groups, dict) else groups)[c]
                t = t * 0.1 + torch.randn(*shape, generator=torch.Generator().manual_seed(int(group))) * 2
            rows.append(t)
        out[key] = torch.stack(rows)
    return out


def _reduce(strategy, server, ids, uploads, participants=None):
    plan = strategy.configure_train(server, ids if participants is None else participants, ids)
    reduction = Reduction(plan.exchange, strategy.population.num_examples)
    for chunk in np.array_split(plan.participants[::-1].copy(), 2):  # two passes, in any order
        reduction.add(chunk, {k: v[chunk] for k, v in uploads.items()})
    return plan, strategy.aggregate_train(server, reduction.finish(comm=MPI.COMM_SELF)[0], round_index=1)


def _built(strategy, seed=0, groups=None):
    """A server whose tree was built from gathered warm-up uploads (default: client c in group
    c mod 3 at every block)."""
    ids = np.arange(strategy.population.size)
    server = strategy.init_server({k: torch.zeros(1, *s) for k, s in strategy.shapes.items()}, frozen={})
    groups = ids % 3 if groups is None else groups
    plan, server = _reduce(strategy, server, ids, _rows(ids, strategy.shapes, seed, groups=groups))
    assert list(plan.exchange.blocks) == [WARMUP] and plan.exchange.blocks[WARMUP].reduce == "gather"
    assert bool(server["tree.built"][0])
    return server


def test_the_tree_is_built_from_the_gathered_warm_up_factors():
    strategy = _strategy()
    server = _built(strategy)
    assert strategy.layers == [MODULES[:2], MODULES[2:3], MODULES[3:]]  # a layer is a block
    assert [c for c in server["tree.counts"].tolist()] == [3, 3, 3]
    assert strategy.metrics(server)["layer_ari"] == [1.0, 1.0, 1.0]
    # cluster experts are the clusters' means of the warm-up factors, uniform weights by default
    rows = _rows(np.arange(9), strategy.shapes, 0, groups=np.arange(9) % 3)
    labels = server["tree.labels"].numpy()
    for key in ("blocks.0.attn.qkv.lora_A", "blocks.2.mlp.fc1.lora_B", "head.weight"):
        l = 2 if key.startswith("head") else int(key.split(".")[1])  # block i is layer i here; the head: deepest
        for g in range(3):
            torch.testing.assert_close(server[key][g], rows[key][labels[l] == g].double().mean(0).float())


def test_a_tree_over_a_sample_of_clients_places_the_others_by_their_own_B():
    """tree_clients < seen: the gathering round trains a seeded sample only, the tree is built on it,
    and every other client is routed to its planted group at every layer (ARI 1 over all clients)."""
    from sklearn.metrics import adjusted_rand_score

    n, cap = 30, 12
    ids, groups = np.arange(n), np.arange(n) % 3
    uploads = _rows(ids, _shapes(), 0, groups=groups)
    strategy, again = _strategy(n, tree_clients=cap), _strategy(n, tree_clients=cap)
    fresh = lambda s: s.init_server({k: torch.zeros(1, *shape) for k, shape in s.shapes.items()}, frozen={})  # noqa: E731
    plan, server = _reduce(strategy, fresh(strategy), ids, uploads)
    sample = plan.participants
    assert len(sample) == cap and len(np.unique(sample)) == cap and np.isin(sample, ids).all()
    np.testing.assert_array_equal(again.configure_train(fresh(again), ids, ids).participants, sample)  # seeded
    labels = server["tree.labels"].numpy()
    assert (labels[:, sample] >= 0).all() and (np.delete(labels, sample, axis=1) < 0).all()
    placed = strategy._labels(server, uploads, ids)  # outside clients routed by their own B
    for layer in range(len(strategy.layers)):
        assert adjusted_rand_score(groups, placed[layer]) == 1.0


@pytest.mark.parametrize("weighting", ["uniform", "samples"])
def test_per_layer_group_reduction_and_external_experts_equal_a_float64_loop(weighting):
    """One round after the tree: each layer's block is grouped by that layer's cut; each cluster's
    new expert is the mean of its participants' uploads, and its external expert the mean of all
    other clients' (from the stored means of clusters absent this round)."""
    strategy = _strategy(weighting=weighting)
    ids = np.arange(9)
    server = _built(strategy, groups={0: ids * 0, 1: ids % 3, 2: ids % 6})  # shared, 3 groups, 6 nested in them
    labels, counts = server["tree.labels"].numpy(), server["tree.counts"].numpy()
    assert counts[0] == 1 and counts[1] == 3 and counts[2] > 3, counts
    absent = np.flatnonzero(labels[2] == 0)  # the deepest layer's cluster 0 sits this round out
    participants = np.setdiff1d(ids, absent)
    uploads = _rows(ids, strategy.shapes, seed=7)
    plan, new = _reduce(strategy, server, ids, uploads, participants)
    n = strategy.population.num_examples if weighting == "samples" else np.ones(9)
    for l, modules in enumerate(strategy.layers):
        block = plan.exchange.blocks[layer_block(l)]
        assert set(block.keys) == {k for m in modules for k in lora_keys(m)}
        assert block.num_groups == counts[l] and np.array_equal(block.groups, labels[l])
        # the reference: stored means, replaced where the cluster took part, weights alike
        means, weights = {}, np.zeros(counts[l])
        for g in range(counts[l]):
            members = [c for c in participants if labels[l, c] == g]
            weights[g] = sum(n[c] for c in members) if members else server[f"tree.weight{l}"][g].item()
            for m in modules:
                for key in lora_keys(m):
                    if members:
                        value = sum(n[c] * uploads[key][c].double() for c in members) / sum(n[c] for c in members)
                    else:
                        value = server[key][g].double()
                    means.setdefault(key, []).append(value)
        for key, per_group in means.items():
            torch.testing.assert_close(new[key], torch.stack(per_group).float(), rtol=0, atol=1e-6)
            expert = mixture_keys(key.rsplit(".", 1)[0])[0 if key.endswith("lora_A") else 1]
            for g in range(counts[l]):
                others = [h for h in range(counts[l]) if h != g]
                want = sum(weights[h] * per_group[h] for h in others) / sum(weights[h] for h in others) \
                    if others else torch.zeros_like(per_group[g])  # one cluster: no external expert
                torch.testing.assert_close(new[expert][g], want.float(), rtol=0, atol=1e-6, msg=f"{expert} {g}")
    # the head follows the deepest layer's cut
    assert plan.exchange.blocks[HEAD].num_groups == counts[-1]


def test_a_one_cluster_layer_has_no_external_expert_and_sends_one_lora_down():
    strategy = _strategy(cut="fixed", fixed_k=1)
    server = _built(strategy)
    assert all(server[mixture_keys(m)[0]].abs().max() == 0 for m in MODULES)
    plan = strategy.configure_train(server, np.arange(9), np.arange(9))
    start = strategy.configure_client(server, strategy.init_client(
        {k: torch.zeros(1, *s) for k, s in strategy.shapes.items()}), np.arange(1), Task.TRAIN).start
    assert not any(k.endswith(("expert_A", "mix_logit")) for k in start)  # plain LoRA, λ ≡ 1 (FedIT)
    up, down = modelled_bytes(plan.exchange, plan.participants, np.full(9, R), strategy.population.num_examples)
    lora = sum(np.prod(s) for k, s in _shapes().items() if "lora" in k) * 4
    head = (3 * 4 + 3) * 4
    assert up == down == 9 * (lora + head)


def test_bytes_are_two_loras_down_one_up():
    strategy = _strategy(cut="fixed", fixed_k=3)
    server = _built(strategy)
    plan = strategy.configure_train(server, np.arange(9), np.arange(9))
    up, down = modelled_bytes(plan.exchange, plan.participants, np.full(9, R), strategy.population.num_examples)
    lora = sum(np.prod(s) for k, s in _shapes().items() if "lora" in k) * 4
    head = (3 * 4 + 3) * 4
    assert (up, down) == (9 * (lora + head), 9 * (2 * lora + head))
    # the warm-up rounds before the last send nothing
    early = _strategy(warmup_rounds=2)
    plan = early.configure_train(early.init_server({"head.weight": torch.zeros(1, 3, 4)}, frozen={}),
                                 np.arange(4), np.arange(9))
    assert modelled_bytes(plan.exchange, plan.participants, np.full(9, R), early.population.num_examples) == (0, 0)


# --- the λ gradient -----------------------------------------------------------------------------
MODEL = ModelConfig(name="vit_tiny_patch16_224", kwargs=dict(img_size=16, patch_size=4, depth=3, embed_dim=16,
                                                              num_heads=2))
LORA = LoraConfig(r=2, lora_alpha=3.0, target_modules=["qkv", "fc1"])


@pytest.mark.parametrize("mix_per", ["block", "module"])
def test_lambda_gradient_equals_dense_float64_autograd(mix_per):
    """The mixing logits' gradients the plan produces (the tying hook included) against autograd
    through each client's dense weights W0 + s[λ B A + (1 − λ) E_B E_A], λ = sigmoid(θ) per (client,
    block) or per (client, module), in float64."""
    model = build_cohort_model(MODEL, LORA, num_classes=4, seed=0).double()
    n = 5
    population = Population(num_examples=np.full(n, 10.0), groups=np.zeros(n, dtype=np.int64),
                            ranks=ClientRanks(np.full(n, 2), 3.0))
    cfg = build(StrategyConfig, {"name": "fedtreelora", "warmup_rounds": 1, "mix_per": mix_per, "cut": "fixed",
                                 "fixed_k": 3})
    strategy = build_strategy(cfg, shapes=dict(model.shapes), population=population)
    ids = np.arange(n)
    server = strategy.init_server({k: torch.zeros(1, *s) for k, s in model.shapes.items()}, frozen={})
    _, server = _reduce(strategy, server, ids, _rows(ids, model.shapes, 3, groups=ids % 3))
    server = {k: v.double() if v.is_floating_point() else v for k, v in server.items()}
    state = {k: v.expand(n, *v.shape[1:]).clone().double() for k, v in strategy.init_client(
        {k: torch.zeros(1, *s) for k, s in model.shapes.items()}).items()}
    g = torch.Generator().manual_seed(11)
    theta = {}  # one θ per (client, block) or per (client, module)
    for modules, logits in zip(strategy.layers, strategy.logits):
        block_theta = torch.randn(n, 1, generator=g, dtype=torch.float64)
        for key in logits:
            theta[key] = block_theta if mix_per == "block" else torch.randn(n, 1, generator=g, dtype=torch.float64)
            state[key] = theta[key].clone()
    plan = strategy.configure_client(server, state, ids, Task.TRAIN)
    assert set(plan.trainable) >= {k for logits in strategy.logits for k in logits}
    x = torch.randn(n * 3, 3, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n * 3,), generator=g)
    live = {k: v.clone().requires_grad_(k in plan.trainable) for k, v in plan.start.items()}
    scaling = torch.full((n,), 1.5, dtype=torch.float64)
    loss = F.cross_entropy(model(x, live, scaling=scaling), y, reduction="none").view(n, 3).mean(1).sum()
    grads = dict(zip(plan.trainable, torch.autograd.grad(loss, [live[k] for k in plan.trainable])))
    plan.hooks.grads(grads, live)

    backbone, head, _ = build_backbone(MODEL, num_classes=4, seed=0)
    backbone = backbone.double().eval()
    base = {k: v.detach() for k, v in backbone.named_parameters()}
    for c in range(n):
        leaves = {}
        for modules in strategy.layers:
            tied = torch.tensor(float(theta[mixture_keys(modules[0])[2]][c]), dtype=torch.float64, requires_grad=True)
            for m in modules:
                leaves[m] = tied if mix_per == "block" else torch.tensor(
                    float(theta[mixture_keys(m)[2]][c]), dtype=torch.float64, requires_grad=True)
        params = dict(base)
        for m, leaf in leaves.items():
            a, b = (plan.start[k][c] for k in lora_keys(m))
            ea, eb = (plan.start[k][c] for k in mixture_keys(m)[:2])
            lam = torch.sigmoid(leaf)
            params[f"{m}.weight"] = base[f"{m}.weight"] + 1.5 * (lam * b @ a + (1 - lam) * eb @ ea)
        params[f"{head}.weight"], params[f"{head}.bias"] = plan.start["head.weight"][c], plan.start["head.bias"][c]
        logits = torch.func.functional_call(backbone, params, (x[3 * c:3 * c + 3],))
        ref = F.cross_entropy(logits, y[3 * c:3 * c + 3])
        unique = list({id(v): v for v in leaves.values()}.values())
        ref_grads = dict(zip(map(id, unique), torch.autograd.grad(ref, unique)))
        for m, leaf in leaves.items():
            got = grads[mixture_keys(m)[2]][c, 0]
            torch.testing.assert_close(got, ref_grads[id(leaf)], rtol=1e-9, atol=1e-12, msg=f"client {c} {m}")
            assert abs(float(got)) > 1e-8


# --- end to end -----------------------------------------------------------------------------------
def _summary(path):
    return json.loads((path / "summary.json").read_text())


@pytest.mark.slow  # ~3 minutes on the shared 2-core machine
def test_rank_count_changes_nothing(tmp_path):
    """1, 2 and 4 ranks (partial participation after the tree): the same summary, cuts and ARI."""
    summaries = {}
    for n in (1, 2, 4):
        proc = mpiexec(n, ["run", CONFIG, *TINY, f"out_dir={tmp_path / f'n{n}'}", *FTL, "rounds=3",
                           "sampling.fraction=0.7", "train.clients_per_pass=2", "--quiet"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        summaries[n] = _summary(tmp_path / f"n{n}" / "quickstart")
        assert summaries[n]["ranks"] == n
    assert summaries[1]["cuts"] and summaries[1]["layer_ari"]
    _close(summaries[1], summaries[2])
    _close(summaries[1], summaries[4])


def test_resume_after_the_tree_is_built_equals_the_uninterrupted_run(tmp_path):
    from test_checkpoint import _assert_same_run

    overrides = TINY + FTL + ["rounds=3", "sampling.fraction=0.7", "checkpoint.keep=3"]
    run(load_config(CONFIG, overrides + [f"out_dir={tmp_path / 'a'}"]), comm=MPI.COMM_SELF, progress=False)
    full = tmp_path / "a" / "quickstart"
    part = tmp_path / "b" / "quickstart"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints/round-000001.h5", part / "checkpoints")  # the tree exists, no mixed round yet
    shutil.copy(full / "config.yaml", part)
    summary = run(load_config(CONFIG, overrides + [f"out_dir={tmp_path / 'b'}"]), comm=MPI.COMM_SELF,
                  progress=False, resume=part / "checkpoints/round-000001.h5")
    assert summary["cuts"]
    _assert_same_run(part, full)


def test_exported_client_is_one_rank_2r_lora_with_fedhpc_logits(tmp_path):
    from peft import PeftModel

    from fedhpc.assemble import assemble
    from fedhpc.io.checkpoint import find_resumable, load

    cfg = load_config(CONFIG, TINY + FTL + [f"out_dir={tmp_path}", "strategy.cut=fixed", "strategy.fixed_k=2"])
    run(cfg, comm=MPI.COMM_SELF, progress=False)
    r = assemble(cfg, MPI.COMM_SELF)
    client = int(r.data.seen[1])
    assert main(["export", str(tmp_path / "quickstart"), "--client", str(client), "--out", str(tmp_path / "k")]) == 0
    config = json.loads((tmp_path / "k" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {2 * cfg.lora.r}  # every layer is mixed (k = 2)
    ids = np.array([client])
    saved = load(find_resumable(tmp_path / "quickstart", comm=MPI.COMM_SELF), clients=ids, device="cpu")
    adapters = r.strategy.configure_evaluate(saved.server, saved.clients, ids)
    assert any(k.endswith("mix_logit") and v.abs().max() > 0 for k, v in adapters.items())  # λ moved off 0.5
    x = r.data.test_x[r.data.client_test[client]]
    backbone, _, call = build_backbone(cfg.model, num_classes=r.data.num_classes, seed=cfg.seed)
    peft_model = PeftModel.from_pretrained(backbone, str(tmp_path / "k")).eval()
    with torch.no_grad():
        ours = r.model(x, {k: v.expand(len(x), *v.shape[1:]) for k, v in adapters.items()},
                       scaling=r.ranks.scaling(ids).expand(len(x)))
        theirs = call(peft_model, x)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    evaluated = json.loads((tmp_path / "quickstart" / "client_accuracy.json").read_text())
    accuracy = float((theirs.argmax(-1) == r.data.test_y[r.data.client_test[client]]).double().mean())
    assert accuracy == evaluated["personalized_accuracy"][evaluated["clients"].index(client)]


# --- the planted depth profile ----------------------------------------------------------------------
def test_depth_profile_teacher_groups_clients_per_block():
    from fedhpc.data import build_federated_data
    from fedhpc.models.teacher import _teacher_adapters, plant_backbone_teacher

    cfg = load_config(CONFIG, TINY + [
        "num_clients=8", "data.planted.num_clusters=4", "data.planted.depth_profile=[1, 2, 4, 0]",
        "model.kwargs={img_size: 16, patch_size: 4, depth: 4, embed_dim: 16, num_heads: 2}"])
    data = build_federated_data(cfg.data, num_clients=8, seed=0)
    model = build_cohort_model(cfg.model, cfg.lora, num_classes=data.num_classes, seed=0)
    teacher = _teacher_adapters(model, data.groups, np.arange(8), cfg.data.planted, 0, root_only=False)
    truth = plant_backbone_teacher(model, data, cfg=cfg.data.planted, seed=0).layer_groups
    expected = [np.zeros(8), data.groups // 2, data.groups, np.arange(8)]
    for l, groups in enumerate(expected):
        assert np.array_equal(truth[l], groups)
        for m in (f"blocks.{l}.attn.qkv", f"blocks.{l}.mlp.fc1"):
            delta = (teacher[f"{m}.lora_B"] @ teacher[f"{m}.lora_A"]).double()
            same = np.array([[torch.equal(delta[i], delta[j]) for j in range(8)] for i in range(8)])
            assert np.array_equal(same, groups[:, None] == groups[None, :]), m
    with pytest.raises(ValueError, match="depth_profile has 3 entries"):
        _teacher_adapters(model, data.groups, np.arange(2), build(type(cfg.data.planted), {
            "num_clusters": 4, "depth_profile": [1, 2, 4]}), 0, root_only=False)
    with pytest.raises(ConfigError, match="divisor of num_clusters"):
        load_config(CONFIG, ["data.planted.depth_profile=[1, 3]"])


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="keep_optimizer_state"):
        load_config(CONFIG, ["strategy.name=fedtreelora", "strategy.keep_optimizer_state=true"])
    with pytest.raises(ConfigError, match="warmup_rounds"):
        load_config(CONFIG, ["strategy.name=fedtreelora", "strategy.warmup_rounds=0"])
    with pytest.raises(ConfigError, match="tree_clients"):
        load_config(CONFIG, ["strategy.name=fedtreelora", "strategy.tree_clients=1"])
    mixed_ranks = Population(num_examples=np.ones(3), groups=np.zeros(3, dtype=np.int64),
                             ranks=ClientRanks(np.array([2, 4, 2]), 4.0))
    with pytest.raises(ValueError, match="one rank"):
        build_strategy(build(StrategyConfig, {"name": "fedtreelora"}), shapes=_shapes(), population=mixed_ranks)

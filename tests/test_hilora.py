"""HiLoRA: clustering, routing, orthogonality, the tiered reduction against float64 dense math, and
end to end (rank-count invariance, nothing of the leaf tier in any collective)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from mpi4py import MPI
from sklearn.metrics import adjusted_rand_score

from fedhpc.config import ConfigError, load_config
from fedhpc.configtree import build
from fedhpc.models.ranks import ClientRanks
from fedhpc.runtime.exchange import modelled_bytes
from fedhpc.runtime.reduce import Reduction
from fedhpc.strategies import Population, StrategyConfig, build_strategy
from fedhpc.train.plan import Task
from fedhpc.strategies.hilora_tiers import CLUSTER, LEAF, TierHooks
from fedhpc.strategies.subspace_clustering import Statistic, bases, cluster_clients, route, subspace_distance

from conftest import REPO, TINY, mpiexec, mpiexec_path

sys.path.insert(0, str(Path(__file__).parent / "mpi"))
import hilora_ranks  # noqa: E402

R = 2  # tier rank; the model rank is 3R
SHAPES = {"m.lora_A": (3 * R, 5), "m.lora_B": (6, 3 * R), "n.lora_A": (3 * R, 4), "n.lora_B": (7, 3 * R),
          "head.weight": (3, 4), "head.bias": (3,)}


def _planted_bases(rng, clusters, dims, r, noise):
    """Per matrix `[N, p, r]`: B = U_{c(i)} M_i + noise, U_c a random orthonormal basis per cluster."""
    out = []
    for p in dims:
        U = [np.linalg.qr(rng.standard_normal((p, r)))[0] for _ in range(clusters.max() + 1)]
        out.append(torch.tensor(np.stack([U[c] @ rng.standard_normal((r, r)) + noise * rng.standard_normal((p, r))
                                          for c in clusters])))
    return out


def test_subspace_distance_is_one_minus_mean_cos2_of_principal_angles():
    rng = np.random.default_rng(0)
    Bs = [torch.tensor(rng.standard_normal((4, p, 3))) for p in (9, 12)]
    d = subspace_distance([bases(B) for B in Bs])
    for i in range(4):
        for j in range(4):
            ref = np.mean([1 - np.mean(np.cos(scipy.linalg.subspace_angles(B[i].numpy(), B[j].numpy())) ** 2)
                           for B in Bs])
            assert d[i, j] == pytest.approx(0.0 if i == j else ref, abs=1e-9)


def test_clustering_recovers_planted_clusters_on_synthetic_bases():
    rng = np.random.default_rng(1)
    truth = rng.permutation(np.arange(30) % 3)
    found = cluster_clients([Statistic(B) for B in _planted_bases(rng, truth, (24, 40), 4, noise=0.3)], k_min=2, k_max=8)
    assert found.count == 3
    assert adjusted_rand_score(truth, found.labels) == 1.0
    assert found.labels[0] == 0  # numbered by first appearance


def test_routing_picks_the_cluster_that_generated_the_client():
    rng = np.random.default_rng(2)
    centres = _planted_bases(rng, np.arange(4), (16, 20), 3, noise=0.0)
    for j in range(4):
        probe = [U[j:j + 1] @ torch.tensor(rng.standard_normal((1, 3, 3))) + 0.2 * torch.randn(1, *U.shape[1:],
                 dtype=torch.float64) for U in centres]
        assert route([Statistic(P) for P in probe], [Statistic(U) for U in centres]).tolist() == [j]


def test_cosine_routing_picks_the_cluster_whose_product_the_probe_follows():
    """Clusters +X and -X share one column space: only the cosine of the products tells them apart."""
    rng = np.random.default_rng(5)
    X = [(torch.tensor(rng.standard_normal((12, 3))), torch.tensor(rng.standard_normal((3, 7)))) for _ in range(2)]
    centres = [Statistic(torch.stack([X[0][0], -X[0][0], X[1][0]]), torch.stack([X[0][1]] * 2 + [X[1][1]]))]
    for j, sign, which in ((0, 1.0, 0), (1, -1.0, 0), (2, 1.0, 1)):
        B, A = X[which]
        probe = [Statistic((sign * B + 0.1 * torch.tensor(rng.standard_normal(B.shape)))[None],
                           (A + 0.1 * torch.tensor(rng.standard_normal(A.shape)))[None])]
        assert route(probe, centres, "cosine").tolist() == [j]


def _make(groups=np.array([0, 1, 0, 1, 1, 0]), num_examples=None, **options):
    """`num_examples`: the clients' sample counts, the weight of their uploads (default: 1 each)."""
    cfg = build(StrategyConfig, {"name": "hilora", **options})
    n = np.ones(len(groups)) if num_examples is None else np.asarray(num_examples, dtype=np.float64)
    population = Population(num_examples=n, groups=groups, ranks=ClientRanks(np.full(len(groups), 3 * R), 6.0))
    return build_strategy(cfg, shapes=SHAPES, population=population)


def _init(g):
    out = {k: torch.randn(1, *s, generator=g) for k, s in SHAPES.items()}
    for k in ("m.lora_B", "n.lora_B"):
        out[k].zero_()
    return out


def _random(count, g):
    return {k: torch.randn(count, *s, generator=g) for k, s in SHAPES.items()}


def _state(strategy, init, count):
    """What `count` clients hold before their first round, `[count, ...]`."""
    return {k: v.expand(count, *v.shape[1:]).clone() for k, v in strategy.init_client(init).items()}


def _round(strategy, server, trained, clients, state=None):
    """One server round of `strategy` through the real reduction on a single process: the new server
    state, the bytes sent to the collectives, the reduction and the clients' new state."""
    plan = strategy.configure_train(server, clients, clients)
    if state is None:
        state = _state(strategy, {k: torch.zeros(1, *shape) for k, shape in SHAPES.items()}, len(clients))
    new_state, upload = strategy.finish_client(server, trained, state, clients)
    reduction = Reduction(plan.exchange, strategy.population.num_examples)
    reduction.add(clients, upload)
    reduced, sent = reduction.finish(comm=MPI.COMM_SELF)
    return strategy.aggregate_train(server, reduced, round_index=1), sent, reduced, new_state


def _rank_r_reference(B, A, w, r):
    """Rank-r truncated SVD of Σ_k w_k B_k A_k / Σ w, in float64 dense numpy."""
    M = np.einsum("k,kij->ij", w / w.sum(), B.double().numpy() @ A.double().numpy())
    U, S, Vt = np.linalg.svd(M)
    return (U[:, :r] * S[:r]) @ Vt[:r]


@pytest.mark.parametrize("mode", ["product_dense", "product_gather"])
def test_root_and_cluster_tiers_match_float64_truncated_svd(mode):
    g = torch.Generator().manual_seed(0)
    groups = np.array([0, 1, 0, 1, 1, 0])
    clients, w = np.arange(6), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64)
    s = _make(groups, num_examples=w.numpy(), root_aggregation=mode, cluster_aggregation=mode, root_rounds=3)
    server = s.init_server(_init(g), frozen={})
    trained = _random(6, g)
    new, *_ = _round(s, server, trained, clients)
    for m in ("m", "n"):
        ref = _rank_r_reference(trained[f"{m}.lora_B"][..., :R], trained[f"{m}.lora_A"][:, :R], w.numpy(), R)
        got = new[f"{m}.root_B"][0].double() @ new[f"{m}.root_A"][0].double()
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-5)
    ref_head = np.tensordot(w.numpy() / w.sum().item(), trained["head.weight"].double().numpy(), axes=1)
    np.testing.assert_allclose(new["head.weight"][0].numpy(), ref_head, rtol=1e-6)
    # cluster stage: put the clients in two clusters and reduce the cluster tier per cluster
    server = {**new, "stage": torch.tensor([CLUSTER]), "clusters": torch.as_tensor(groups),
              **{k: new[k].expand(2, *new[k].shape[1:]).clone()
                 for k in ("m.cluster_A", "m.cluster_B", "n.cluster_A", "n.cluster_B", "head.weight", "head.bias")}}
    trained = _random(6, g)
    new, *_ = _round(s, server, trained, clients)
    for c in (0, 1):
        sel = groups == c
        for m in ("m", "n"):
            ref = _rank_r_reference(trained[f"{m}.lora_B"][sel][..., R:2 * R], trained[f"{m}.lora_A"][sel][:, R:2 * R],
                                    w.numpy()[sel], R)
            got = new[f"{m}.cluster_B"][c].double() @ new[f"{m}.cluster_A"][c].double()
            np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new["m.root_A"], server["m.root_A"])  # the frozen root does not move


@pytest.mark.parametrize("mode", ["product_dense", "product_gather"])
def test_cluster_reduction_over_three_ranks_equals_a_float64_reference(mode):
    launcher = mpiexec_path()  # fails, not skips, when mpich is missing
    script = Path(__file__).parent / "mpi" / "hilora_ranks.py"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([launcher, "-n", "3", sys.executable, str(script), mode], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    ids, groups = np.arange(hilora_ranks.NUM_CLIENTS), hilora_ranks.clusters()
    rows, w = hilora_ranks.trained(ids), hilora_ranks.weights(ids).numpy()
    for c in range(hilora_ranks.NUM_CLUSTERS):
        sel = groups == c
        for m in ("m", "n"):
            ref = _rank_r_reference(rows[f"{m}.lora_B"][sel][..., R:2 * R], rows[f"{m}.lora_A"][sel][:, R:2 * R],
                                    w[sel], R)
            for out in results:  # every rank holds the same result
                np.testing.assert_allclose(np.array(out["products"][m][c]), ref, rtol=1e-5, atol=1e-5)
    sent = [out["sent"] for out in results]
    if mode == "product_dense":  # clusters x (dense ΔW + head + weight) in float64, whatever the clients per rank
        width = 6 * 5 + 7 * 4 + 3 * 4 + 3 + 1
        assert sent == [hilora_ranks.NUM_CLUSTERS * width * 8] * 3
    else:  # the factors of every client the rank hosts: grows with the clients
        assert sent[0] > sent[2]  # rank 0 hosts 4 clients, rank 2 hosts 3


@pytest.mark.parametrize("statistic", ["trained_B", "update_product"])
def test_last_root_round_gathers_everyone_and_clusters_them(statistic):
    g = torch.Generator().manual_seed(3)
    groups = np.array([0, 1, 0, 1, 1, 0])
    options = {"basis_source": "update_product", "similarity": "cosine"} if statistic == "update_product" else {}
    s = _make(groups, root_rounds=1, k_max=3, **options)
    init = _init(g)  # its B is zero: so is the root B the clients receive
    server = s.init_server(init, frozen={})
    plan = s.configure_train(server, np.array([1, 4]), np.arange(6))
    assert plan.participants.tolist() == list(range(6))
    rng = np.random.default_rng(0)
    state, trained = _state(s, init, 6), _random(6, g)
    if statistic == "trained_B":  # a cluster's clients keep and train B in one planted column space
        for m, b in zip(("m", "n"), _planted_bases(rng, groups, (6, 7), R, 0.05)):
            state[f"{m}.ema_B"] = b.float()
            trained[f"{m}.lora_B"][..., :R] = b.float()
    else:  # product statistics: each cluster's clients share B ≈ U_c, A ≈ V_c (rank 2R), and train along them
        for m, (p, d) in (("m", (6, 5)), ("n", (7, 4))):
            U, V = rng.standard_normal((2, p, 2 * R)), rng.standard_normal((2, 2 * R, d))
            state[f"{m}.ema_B"] = torch.tensor(U[groups] + 0.05 * rng.standard_normal((6, p, 2 * R))).float()
            state[f"{m}.ema_A"] = torch.tensor(V[groups] + 0.05 * rng.standard_normal((6, 2 * R, d))).float()
            trained[f"{m}.lora_B"][..., :R] = torch.tensor(U[groups][..., :R]).float()
            trained[f"{m}.lora_A"][:, :R] = torch.tensor(V[groups][:, :R]).float()
    statistics = {k for k in state if ".ema_" in k}
    assert set(plan.exchange.blocks["gathered"].keys) == statistics
    tier_bytes = sum(SHAPES[f"{m}.lora_A"][1] * R + SHAPES[f"{m}.lora_B"][0] * R for m in ("m", "n")) * 4
    head_bytes = (3 * 4 + 3) * 4
    per_client = tier_bytes + head_bytes + sum(state[k][0].numel() for k in statistics) * 4
    up, _ = modelled_bytes(plan.exchange, plan.participants, np.full(6, 3 * R), np.ones(6))
    assert up == 6 * per_client
    new, _, reduced, new_state = _round(s, server, trained, np.arange(6), state)
    rows = reduced["gathered"]  # what LSAC clustered: every client's statistic after this round's EMA step
    assert rows.clients.tolist() == list(range(6))
    for k in statistics:
        torch.testing.assert_close(rows.values[k], new_state[k], rtol=0, atol=0)
    assert int(new["stage"][0]) == CLUSTER and new["m.cluster_B"].shape[0] == 2
    assert adjusted_rand_score(groups, new["clusters"].numpy()) == 1.0
    assert s.metrics(new)["cluster_ari"] == 1.0


def _hooks_descent(active, steps=300, lr=0.05):
    g = torch.Generator().manual_seed(4)
    B = torch.randn(2, 12, 3 * R, generator=g, dtype=torch.float64)
    B[..., :R] = torch.linalg.qr(B[..., :R])[0]
    A = torch.randn(2, 3 * R, 5, generator=g, dtype=torch.float64)
    adapters = {"m.lora_A": A, "m.lora_B": B}
    hooks = TierHooks(["m"], R, active, gamma_cluster=0.1, gamma_leaf=0.2)
    before = {k: v.clone() for k, v in adapters.items()}
    ref = 0.1 * (B[..., :R].mT @ B[..., active * R:(active + 1) * R]).square().sum((1, 2))
    if active == LEAF:
        ref = ref + 0.2 * (B[..., R:2 * R].mT @ B[..., 2 * R:]).square().sum((1, 2))
    torch.testing.assert_close(hooks.loss(adapters, before), ref)
    from fedhpc.train.optim import OptimConfig, StackedOptimizer

    opt = StackedOptimizer(OptimConfig(name="sgd", lr=lr))  # the real update, masked by the hooks' movable
    state = opt.init_state(adapters)
    movable = {k: hooks.movable(k) for k in adapters}
    for _ in range(steps):
        live = {k: v.clone().requires_grad_(True) for k, v in adapters.items()}
        gB, gA = torch.autograd.grad(hooks.loss(live, before).sum(), [live["m.lora_B"], live["m.lora_A"]],
                                     allow_unused=True)
        grads = {"m.lora_B": gB, "m.lora_A": torch.ones_like(A) if gA is None else gA}  # unmasked: every tier pulled
        opt.step(adapters, grads, state, movable=movable)
    return before, adapters


def test_orthogonality_penalty_drives_cluster_overlap_with_root_down_and_masks_other_tiers():
    before, after = _hooks_descent(CLUSTER, lr=1.0, steps=100)
    overlap = lambda t: torch.linalg.matrix_norm(t["m.lora_B"][..., :R].mT @ t["m.lora_B"][..., R:2 * R])
    assert (overlap(after) < 1e-3 * overlap(before)).all()
    for key, reduce in (("m.lora_A", 2), ("m.lora_B", 1)):  # rows of A, columns of B: only the cluster tier moved
        moved = (after[key] != before[key]).any(dim=reduce)
        assert moved[:, R:2 * R].all() and not moved[:, :R].any() and not moved[:, 2 * R:].any(), key


def test_frozen_tiers_and_head_do_not_move_under_weight_decay():
    from fedhpc.train.optim import OptimConfig, StackedOptimizer

    g = torch.Generator().manual_seed(8)
    params = {"m.lora_A": torch.randn(2, 3 * R, 5, generator=g), "m.lora_B": torch.randn(2, 6, 3 * R, generator=g),
              "head.weight": torch.randn(2, 3, 4, generator=g)}
    before = {k: v.clone() for k, v in params.items()}
    hooks = TierHooks(["m"], R, CLUSTER, gamma_cluster=0.1, gamma_leaf=0.1, train_head=False)
    opt = StackedOptimizer(OptimConfig(name="adamw", lr=0.05, weight_decay=0.5))
    state = opt.init_state(params)
    movable = {k: m for k in params if (m := hooks.movable(k)) is not None}
    for _ in range(5):
        grads = {k: torch.randn(v.shape, generator=g) * movable[k] for k, v in params.items()}
        opt.step(params, grads, state, movable=movable)
    live = slice(R, 2 * R)
    for frozen in (slice(0, R), slice(2 * R, 3 * R)):
        torch.testing.assert_close(params["m.lora_A"][:, frozen], before["m.lora_A"][:, frozen], rtol=0, atol=0)
        torch.testing.assert_close(params["m.lora_B"][..., frozen], before["m.lora_B"][..., frozen], rtol=0, atol=0)
    torch.testing.assert_close(params["head.weight"], before["head.weight"], rtol=0, atol=0)
    assert (params["m.lora_A"][:, live] - before["m.lora_A"][:, live]).abs().min() > 0


def test_leaf_penalty_drives_overlap_with_root_and_cluster_down():
    before, after = _hooks_descent(LEAF, lr=0.1, steps=400)
    for frozen in (0, 1):
        overlap = lambda t: torch.linalg.matrix_norm(t["m.lora_B"][..., frozen * R:(frozen + 1) * R].mT
                                                     @ t["m.lora_B"][..., 2 * R:])
        assert (overlap(after) < 1e-2 * overlap(before)).all()


def test_unseen_client_routed_to_its_cluster_starts_from_it():
    g = torch.Generator().manual_seed(5)
    s = _make()
    server = s.init_server(_init(g), frozen={})
    rng = np.random.default_rng(6)
    centres = _planted_bases(rng, np.arange(3), (6, 7), R, 0.0)
    new = np.array([3, 4, 5])  # clients that missed the rounds: no cluster
    server.update(stage=torch.tensor([LEAF]), clusters=torch.tensor([0, 1, 2, -1, -1, -1]))
    for m, U in zip(("m", "n"), centres):
        server[f"{m}.cluster_B"] = U.float()
        server[f"{m}.cluster_A"] = torch.randn(3, R, SHAPES[f"{m}.lora_A"][1], generator=g)
    for h in ("head.weight", "head.bias"):
        server[h] = torch.randn(3, *SHAPES[h], generator=g)
    kept = _state(s, _init(g), 3)
    probe = s.configure_client(server, kept, new, Task.PROBE)
    assert probe.steps == 20 and probe.hooks.active == CLUSTER and set(probe.trainable) == set(SHAPES)
    probed = dict(probe.start)
    for m, U in zip(("m", "n"), centres):  # as if client u's probe learned cluster [2, 0, 1][u]'s directions
        probed[f"{m}.lora_B"] = probed[f"{m}.lora_B"].clone()
        probed[f"{m}.lora_B"][..., R:2 * R] = U[[2, 0, 1]].float() @ torch.randn(3, R, R, generator=g)
    state = {k: probed.get(k, v) for k, v in kept.items()}  # what the probe trained, the new client keeps
    evaluated = s.configure_evaluate(server, state, new)
    plan = s.configure_client(server, state, new, Task.FINETUNE)
    assert plan.hooks.active == LEAF
    for start in (evaluated, plan.start):  # evaluated zero-shot with its cluster, then fine-tuned from it
        torch.testing.assert_close(start["m.lora_B"][..., R:2 * R], server["m.cluster_B"][[2, 0, 1]])
        torch.testing.assert_close(start["head.weight"], server["head.weight"][[2, 0, 1]])
        torch.testing.assert_close(start["m.lora_A"][:, :R], server["m.root_A"].expand(3, R, 5))


def test_leaf_stage_sends_and_reduces_no_adapter():
    g = torch.Generator().manual_seed(7)
    s = _make()
    server = {**s.init_server(_init(g), frozen={}), "stage": torch.tensor([LEAF]), "clusters": torch.zeros(6, dtype=torch.int64)}
    plan = s.configure_train(server, np.arange(6), np.arange(6))
    assert plan.exchange.blocks == {} and plan.exchange.keys_up() == []
    tier_bytes = sum(SHAPES[f"{m}.lora_A"][1] * R + SHAPES[f"{m}.lora_B"][0] * R for m in ("m", "n")) * 4
    head_bytes = (3 * 4 + 3) * 4
    # the final cluster tier and head arrive in the first leaf round, and nothing after it
    assert modelled_bytes(plan.exchange, plan.participants, np.full(6, 3 * R), np.ones(6)) == (
        0, 6 * (tier_bytes + head_bytes))
    later = s.configure_train({**server, "stage_round": torch.tensor([1])}, np.arange(6), np.arange(6)).exchange
    assert modelled_bytes(later, plan.participants, np.full(6, 3 * R), np.ones(6)) == (0, 0)
    new, sent, _, state = _round(s, server, _random(6, g), np.arange(6))
    assert sent == 0  # nothing enters a collective
    assert state["leaf_started"].tolist() == [1] * 6
    for k, v in server.items():
        if k != "stage_round":
            torch.testing.assert_close(new[k], v, equal_nan=True)


def test_keep_optimizer_state_is_a_config_error():
    with pytest.raises(ConfigError, match="keep_optimizer_state"):
        load_config(REPO / "configs/hilora.yaml", ["strategy.keep_optimizer_state=true"])


HILORA_TINY = ["strategy.name=hilora", "rounds=4", "strategy.root_rounds=1", "strategy.cluster_rounds=2",
               "strategy.probe_steps=3", "strategy.basis_source=update_product", "strategy.similarity=cosine", "sampling.fraction=0.7", "train.clients_per_pass=2", "--quiet"]


def test_rank_count_changes_nothing_and_leaf_rounds_move_no_adapter(tmp_path):
    from test_experiment import _close

    runs = {}
    for n in (1, 2, 4):
        out = tmp_path / f"n{n}"
        proc = mpiexec(n, ["run", str(REPO / "configs/quickstart.yaml"), *TINY, f"out_dir={out}", *HILORA_TINY])
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[n] = (json.loads((out / "quickstart/summary.json").read_text()),
                   [json.loads(l) for l in (out / "quickstart/metrics.jsonl").read_text().splitlines()])
    _close(runs[1][0], runs[2][0])
    _close(runs[1][0], runs[4][0])
    summary, rounds = runs[2]
    assert 2 <= summary["num_clusters"] <= 5  # k_min = 2 (default) .. seen clients - 1
    assert summary["unseen_accuracy_finetuned"] is not None
    assert [m["participants"] for m in rounds][0] == 6  # the clustering round takes every seen client
    leaf = [i for i, m in enumerate(rounds) if i > 0 and rounds[i - 1]["next_stage"] == "leaf"]
    assert leaf == [3]
    for i in leaf:
        assert rounds[i]["bytes_up"] == rounds[i - 1]["bytes_up"]
        assert rounds[i]["mpi_bytes"] == rounds[i - 1]["mpi_bytes"]  # no collective on the training path

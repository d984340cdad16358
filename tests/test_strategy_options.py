"""Strategy options and rounds no other test runs, each against float64 numpy written here: FedSA-LoRA's
round, FedIT's private head, HetLoRA's tail penalty, HiLoRA's relative change, root_tau stop,
factor_mean, global model and leaf_trains_head, and the round's client sampling."""
import numpy as np
import pytest
import torch

from fedhpc.config import SamplingConfig
from fedhpc.experiment import sample_clients
from fedhpc.runtime.exchange import modelled_bytes
from fedhpc.strategies.hilora_tiers import CLUSTER, LEAF, ROOT, relative_change
from fedhpc.train.plan import Task

import test_hilora as hl
import test_product_strategies as ps
import test_strategies as st


# --- FedSA-LoRA: a real round ------------------------------------------------------------------------
def test_fedsa_lora_round_averages_a_by_samples_and_keeps_b_and_head_per_client():
    g = torch.Generator().manual_seed(11)
    w = np.array([5.0, 1.0, 3.0, 2.0, 4.0])
    s = st._make("fedsa_lora", num_examples=w)
    init = st._init(g)
    server = s.init_server(init, frozen={})
    assert set(server) == {"m.lora_A"}
    clients, trained = np.array([0, 2, 4]), st._random(3, g)
    state = st._state(s, init, 3)
    new_state, _ = s.finish_client(server, trained, state, clients)
    new = st._round(s, server, state, clients, trained)
    p = w[clients] / w[clients].sum()
    np.testing.assert_allclose(new["m.lora_A"][0].numpy(), np.tensordot(p, trained["m.lora_A"].double().numpy(), 1),
                               rtol=1e-6, atol=1e-7)
    for key in ("m.lora_B", "head.weight", "head.bias"):  # private: each client keeps its own, nothing averaged
        assert key not in new
        torch.testing.assert_close(new_state[key], trained[key], rtol=0, atol=0)
    start = s.configure_client(new, new_state, clients, Task.TRAIN).start
    torch.testing.assert_close(start["m.lora_A"], new["m.lora_A"].expand(3, 2, 5))
    torch.testing.assert_close(start["m.lora_B"], trained["m.lora_B"])


# --- FedIT with a private head ---------------------------------------------------------------------
def test_fedit_private_head_is_kept_not_sent_and_not_counted():
    g = torch.Generator().manual_seed(12)
    w = np.array([2.0, 1.0, 3.0, 2.0, 4.0])
    s = st._make("fedit", num_examples=w, aggregate_head=False)
    shared = st._make("fedit", num_examples=w)
    init = st._init(g)
    server = s.init_server(init, frozen={})
    assert set(server) == {"m.lora_A", "m.lora_B"} and set(s.init_client(init)) == {"head.weight", "head.bias"}
    clients = np.array([1, 3, 4])
    plan = s.configure_train(server, clients, np.arange(5))
    assert sorted(plan.exchange.keys_up()) == ["m.lora_A", "m.lora_B"] and set(plan.exchange.down) == {"m.lora_A", "m.lora_B"}
    up, down = modelled_bytes(plan.exchange, clients, np.full(5, 2), w)
    assert up == down == 3 * (2 * 5 + 3 * 2) * 4  # LoRA only: no head bytes either way
    up_shared, _ = modelled_bytes(shared.configure_train(shared.init_server(init, frozen={}), clients,
                                                         np.arange(5)).exchange, clients, np.full(5, 2), w)
    assert up_shared == up + 3 * (4 * 3 + 4) * 4
    state, trained = st._state(s, init, 3), st._random(3, g)
    new_state, _ = s.finish_client(server, trained, state, clients)
    new = st._round(s, server, state, clients, trained)
    p = w[clients] / w[clients].sum()
    for key in ("m.lora_A", "m.lora_B"):
        np.testing.assert_allclose(new[key][0].numpy(), np.tensordot(p, trained[key].double().numpy(), 1), rtol=1e-6,
                                   atol=1e-7)
    for key in ("head.weight", "head.bias"):
        torch.testing.assert_close(new_state[key], trained[key], rtol=0, atol=0)
    start = s.configure_client(new, new_state, clients, Task.TRAIN).start
    torch.testing.assert_close(start["head.weight"], trained["head.weight"], rtol=0, atol=0)


# --- HetLoRA's tail penalty ------------------------------------------------------------------------------
def test_hetlora_tail_penalty_is_lambda_times_the_tail_product_norm_at_each_clients_rank():
    s = ps._make("hetlora", prune_gamma=0.5, prune_lambda=0.3)
    server = {**s.init_server(ps._init(), frozen={}), **ps._trained(np.array([3]), 21)}
    clients = np.array([0, 1, 2])  # ranks 2, 4, 1: tails 1..1, 2..3, 0..0
    state = ps._state(s, clients)
    plan = s.configure_client(server, state, clients, Task.TRAIN)
    adapters = {k: v.double().requires_grad_(True) for k, v in ps._trained(clients, 22).items()}
    loss = plan.hooks.loss(adapters, {})
    grads = torch.autograd.grad(loss.sum(), [adapters["m.lora_B"], adapters["n.lora_A"]])
    for i, r in enumerate(ps.RANKS[clients]):
        t = int(np.floor(0.5 * r))

        def penalty(Bm, Am, Bn, An):
            return 0.3 * torch.sqrt(sum(torch.linalg.norm(B[:, t:r] @ A[t:r]) ** 2 for B, A in ((Bm, Am), (Bn, An))))

        ref_in = [adapters[k][i].detach().clone().requires_grad_(True) for k in ("m.lora_B", "m.lora_A", "n.lora_B", "n.lora_A")]
        ref = penalty(*ref_in)
        ref_grads = torch.autograd.grad(ref, [ref_in[0], ref_in[3]])
        assert loss[i].item() == pytest.approx(ref.item(), rel=1e-9), f"client {clients[i]}"
        torch.testing.assert_close(grads[0][i], ref_grads[0], rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(grads[1][i], ref_grads[1], rtol=1e-7, atol=1e-10)
    # pruned to rank 1: the whole rank is the tail (t = 0)
    pruned = {**state, "hetlora.rank": torch.tensor([[1.0], [1.0], [1.0]])}
    low = s.configure_client(server, pruned, clients, Task.TRAIN).hooks.loss(adapters, {})
    for i in range(3):
        ref = 0.3 * np.sqrt(sum(np.linalg.norm(adapters[f"{m}.lora_B"][i, :, :1].detach().numpy()
                                               @ adapters[f"{m}.lora_A"][i, :1].detach().numpy()) ** 2 for m in "mn"))
        assert low[i].item() == pytest.approx(ref, rel=1e-9)
    for off in ({"prune": False}, {"prune_lambda": 0.0}):
        other = ps._make("hetlora", **off)
        assert other.configure_client(server, ps._state(other, clients), clients, Task.TRAIN).hooks.loss(adapters, {}) is None


# --- HiLoRA ------------------------------------------------------------------------------------------
def test_relative_change_is_the_dense_frobenius_ratio_over_all_matrices():
    g = torch.Generator().manual_seed(13)
    old = {f"{m}.root_{f}": torch.randn(1, *shape, generator=g) for m, dims in (("m", (6, 5)), ("n", (7, 4)))
           for f, shape in (("A", (hl.R, dims[1])), ("B", (dims[0], hl.R)))}
    new = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in old.items()}
    prod = lambda t, m: t[f"{m}.root_B"][0].double().numpy() @ t[f"{m}.root_A"][0].double().numpy()
    diff = sum(np.linalg.norm(prod(new, m) - prod(old, m)) ** 2 for m in "mn")
    norm = sum(np.linalg.norm(prod(old, m)) ** 2 for m in "mn")
    assert relative_change(["m", "n"], old, new) == pytest.approx(np.sqrt(diff / norm), rel=1e-9)
    assert relative_change(["m", "n"], old, old) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("tau, stops", [(1e6, True), (0.0, False)])
def test_root_tau_ends_the_root_stage_after_the_next_round(tau, stops):
    """A change below root_tau marks the root final: the next round is the clustering round (everyone,
    statistics gathered) and the cluster stage follows; above it, the root stage goes on."""
    g = torch.Generator().manual_seed(14)
    groups = np.array([0, 1, 0, 1, 1, 0])
    s = hl._make(groups, root_rounds=10, root_tau=tau)
    init = hl._init(g)
    init["m.lora_B"] = torch.randn(init["m.lora_B"].shape, generator=g)  # a nonzero root: a finite change
    init["n.lora_B"] = torch.randn(init["n.lora_B"].shape, generator=g)
    server = s.init_server(init, frozen={})
    new, *_ = hl._round(s, server, hl._random(6, g), np.arange(6))
    change = relative_change(["m", "n"], server, new)
    assert float(new["root_change"][0]) == pytest.approx(change, rel=1e-12) and np.isfinite(change) and change > 0
    assert int(new["stage"][0]) == ROOT and int(new["root_final"][0]) == int(stops)
    plan = s.configure_train(new, np.array([0, 3]), np.arange(6))
    assert ("gathered" in plan.exchange.blocks) == stops
    assert plan.participants.tolist() == (list(range(6)) if stops else [0, 3])
    if stops:
        state = hl._state(s, init, 6)
        rng = np.random.default_rng(3)
        for m, b in zip(("m", "n"), hl._planted_bases(rng, groups, (6, 7), hl.R, 0.05)):
            state[f"{m}.ema_B"] = b.float()
        after, *_ = hl._round(s, new, hl._random(6, g), np.arange(6), state)
        assert int(after["stage"][0]) == CLUSTER and int(after["root_final"][0]) == 0


def test_factor_mean_averages_each_tier_factor_by_samples():
    g = torch.Generator().manual_seed(15)
    w = np.array([1.0, 4.0, 2.0, 3.0, 5.0, 6.0])
    groups = np.array([0, 1, 0, 1, 1, 0])
    s = hl._make(groups, num_examples=w, root_aggregation="factor_mean", cluster_aggregation="factor_mean", root_rounds=3)
    server = s.init_server(hl._init(g), frozen={})
    trained = hl._random(6, g)
    new, *_ = hl._round(s, server, trained, np.arange(6))
    p = w / w.sum()
    for m in "mn":
        np.testing.assert_allclose(new[f"{m}.root_A"][0].numpy(),
                                   np.tensordot(p, trained[f"{m}.lora_A"][:, :hl.R].double().numpy(), 1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new[f"{m}.root_B"][0].numpy(),
                                   np.tensordot(p, trained[f"{m}.lora_B"][..., :hl.R].double().numpy(), 1), rtol=1e-5, atol=1e-6)
    server = {**new, "stage": torch.tensor([CLUSTER]), "clusters": torch.as_tensor(groups),
              **{k: new[k].expand(2, *new[k].shape[1:]).clone()
                 for k in ("m.cluster_A", "m.cluster_B", "n.cluster_A", "n.cluster_B", "head.weight", "head.bias")}}
    trained = hl._random(6, g)
    new, *_ = hl._round(s, server, trained, np.arange(6))
    for c in (0, 1):
        sel = groups == c
        q = w[sel] / w[sel].sum()
        np.testing.assert_allclose(new["m.cluster_A"][c].numpy(),
                                   np.tensordot(q, trained["m.lora_A"][sel][:, hl.R:2 * hl.R].double().numpy(), 1),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new["n.cluster_B"][c].numpy(),
                                   np.tensordot(q, trained["n.lora_B"][sel][..., hl.R:2 * hl.R].double().numpy(), 1),
                                   rtol=1e-5, atol=1e-6)


def test_global_model_is_the_root_tier_and_the_root_head():
    g = torch.Generator().manual_seed(16)
    s = hl._make()
    init = hl._init(g)
    server = s.init_server(init, frozen={})
    server = {**server, **{k: torch.randn(v.shape, generator=g) for k, v in server.items()
                           if k.endswith(("_A", "_B")) or k.startswith(("head.", "root.head."))}}
    out = s.global_model(server, init)
    assert set(out) == set(hl.SHAPES)
    for m in "mn":
        dense = out[f"{m}.lora_B"][0].double().numpy() @ out[f"{m}.lora_A"][0].double().numpy()
        root = server[f"{m}.root_B"][0].double().numpy() @ server[f"{m}.root_A"][0].double().numpy()
        np.testing.assert_allclose(dense, root, rtol=1e-6, atol=1e-6)  # the cluster and leaf slots add nothing
    for h in ("head.weight", "head.bias"):
        torch.testing.assert_close(out[h], server[f"root.{h}"], rtol=0, atol=0)
        assert not torch.equal(out[h], server[h])


@pytest.mark.parametrize("trains_head", [True, False])
def test_leaf_trains_head_decides_whether_the_leaf_stage_moves_the_head(trains_head):
    g = torch.Generator().manual_seed(17)
    s = hl._make(leaf_trains_head=trains_head, leaf_lr_scale=0.25)
    init = hl._init(g)
    server = {**s.init_server(init, frozen={}), "clusters": torch.zeros(6, dtype=torch.int64)}
    for stage in (ROOT, CLUSTER, LEAF):
        plan = s.configure_client({**server, "stage": torch.tensor([stage])}, hl._state(s, init, 2), np.array([0, 1]),
                                  Task.TRAIN)
        mask = plan.hooks.movable("head.weight")
        if stage == LEAF and not trains_head:
            assert mask is not None and not bool(mask.any())
        else:
            assert mask is None or bool(mask.all())
        assert plan.hooks.lr_scale == (0.25 if stage == LEAF else 1.0)  # leaf_lr_scale: the leaf stage only
    fine = s.configure_client({**server, "stage": torch.tensor([LEAF])}, hl._state(s, init, 2), np.array([0, 1]),
                              Task.FINETUNE)
    assert (fine.hooks.movable("head.bias") is None or bool(fine.hooks.movable("head.bias").all())) == trains_head


# --- client sampling ---------------------------------------------------------------------------------
def test_sample_clients_count_fraction_rounding_and_a_new_draw_each_round():
    seen = np.array([0, 2, 3, 5, 8, 9, 11, 12, 14, 15])
    for fraction, want in ((0.25, 2), (0.35, 4), (0.05, 1), (1.0, 10), (0.94, 9), (0.96, 10)):
        got = sample_clients(seen, SamplingConfig(fraction=fraction), seed=0, round_index=1)
        assert len(got) == want, fraction
        assert np.all(np.diff(got) > 0) and set(got.tolist()) <= set(seen.tolist())
    count = sample_clients(seen, SamplingConfig(fraction=0.1, count=4), seed=0, round_index=1)
    assert len(count) == 4  # count wins over fraction
    assert sample_clients(seen, SamplingConfig(count=40), seed=0, round_index=1).tolist() == seen.tolist()
    draws = [tuple(sample_clients(seen, SamplingConfig(count=4), seed=0, round_index=r)) for r in range(1, 9)]
    assert len(set(draws)) >= 6  # a new draw each round (C(10, 4) = 210 subsets)
    assert draws[0] == tuple(sample_clients(seen, SamplingConfig(count=4), seed=0, round_index=1))  # keyed: repeatable
    assert tuple(sample_clients(seen, SamplingConfig(count=4), seed=1, round_index=1)) != draws[0] or \
        tuple(sample_clients(seen, SamplingConfig(count=4), seed=2, round_index=1)) != draws[0]
    hits = np.zeros(16)
    for r in range(400):  # uniform without replacement: each seen client in ~40 % of the rounds
        hits[sample_clients(seen, SamplingConfig(count=4), seed=0, round_index=r)] += 1
    assert hits[[1, 4, 6, 7, 10, 13]].sum() == 0
    assert np.all(np.abs(hits[seen] / 400 - 0.4) < 0.1)


def test_fedsa_lora_share_head_averages_the_head_with_a():
    g = torch.Generator().manual_seed(18)
    w = np.array([2.0, 5.0, 1.0, 3.0, 4.0])
    s = st._make("fedsa_lora", num_examples=w, share_head=True)
    init = st._init(g)
    server = s.init_server(init, frozen={})
    assert set(server) == {"m.lora_A", "head.weight", "head.bias"} and set(s.init_client(init)) == {"m.lora_B"}
    clients, trained = np.array([1, 2, 4]), st._random(3, g)
    new = st._round(s, server, st._state(s, init, 3), clients, trained)
    p = w[clients] / w[clients].sum()
    for key in ("m.lora_A", "head.weight", "head.bias"):
        np.testing.assert_allclose(new[key][0].numpy(), np.tensordot(p, trained[key].double().numpy(), 1), rtol=1e-6,
                                   atol=1e-7)


def test_defaults_are_the_documented_ones():
    """Defaults from their sources: HiLoRA's third-party numbers (algorithms.md §3: 15 / 20 rounds, λ 0.9,
    K in [2, 10], γ 0.1, 0.1), FedSA-LoRA's local classifier (its official config), a restarting optimizer,
    no LR scaling, and torch's own AdamW defaults for lr, betas and eps."""
    import inspect

    from fedhpc.configtree import build
    from fedhpc.strategies import StrategyConfig
    from fedhpc.train.optim import OptimConfig
    from fedhpc.train.plan import LocalHooks

    hilora = build(StrategyConfig, {"name": "hilora"})
    assert (hilora.root_rounds, hilora.cluster_rounds, hilora.ema_decay, hilora.k_min, hilora.k_max,
            hilora.gamma_cluster, hilora.gamma_leaf, hilora.leaf_lr_scale, hilora.leaf_trains_head) == (
        15, 20, 0.9, 2, 10, 0.1, 0.1, 1.0, True)
    assert build(StrategyConfig, {"name": "fedsa_lora"}).share_head is False
    assert build(StrategyConfig, {"name": "fedit"}).keep_optimizer_state is False
    assert LocalHooks().lr_scale == 1.0
    torch_adamw = inspect.signature(torch.optim.AdamW).parameters
    ours = OptimConfig()
    assert ours.name == "adamw" and ours.weight_decay == 0.0
    assert (ours.lr, tuple(ours.betas), ours.eps) == (torch_adamw["lr"].default, tuple(torch_adamw["betas"].default),
                                                      torch_adamw["eps"].default)

"""Each strategy's round against a float64 dense implementation written here from its equations."""
import numpy as np
import pytest
import torch
from mpi4py import MPI

from fedhpc.configtree import build
from fedhpc.models.ranks import ClientRanks
from fedhpc.runtime.exchange import modelled_bytes
from fedhpc.runtime.reduce import Reduction
from fedhpc.strategies import Population, StrategyConfig, build_strategy, list_strategies
from fedhpc.train.plan import Task

KEYS = {"m.lora_A": (2, 5), "m.lora_B": (3, 2), "head.weight": (4, 3), "head.bias": (4,)}


def _make(name, groups=np.array([0, 1, 0, 1, 1]), num_examples=np.ones(5), **options):
    """`num_examples` are the clients' sample counts: the weight of their uploads."""
    cfg = build(StrategyConfig, {"name": name, **options})
    population = Population(num_examples=np.asarray(num_examples, dtype=np.float64), groups=groups,
                            ranks=ClientRanks(np.full(len(groups), 2), 4.0))
    return build_strategy(cfg, shapes=KEYS, population=population)


def _state(strategy, init, count):
    """What `count` clients hold before their first round, `[count, ...]`."""
    return {k: v.expand(count, *v.shape[1:]).clone() for k, v in strategy.init_client(init).items()}


def _round(strategy, server, state, clients, trained):
    """One server round through the real reduction on a single process."""
    plan = strategy.configure_train(server, clients, clients)
    _, upload = strategy.finish_client(server, trained, state, clients)
    reduction = Reduction(plan.exchange, strategy.population.num_examples)
    reduction.add(clients, upload)
    reduced, _ = reduction.finish(comm=MPI.COMM_SELF)
    return strategy.aggregate_train(server, reduced, round_index=1)


def _random(count, g):
    return {k: torch.randn(count, *s, generator=g) for k, s in KEYS.items()}


def _init(g):
    return {k: v[:1] for k, v in _random(1, g).items()}


def test_registry_lists_the_spine_methods():
    assert {"fedit", "ffa_lora", "fedsa_lora", "local", "cluster_fedit"} <= set(list_strategies())


def test_fedit_is_the_weighted_mean_of_every_factor():
    g = torch.Generator().manual_seed(0)
    s = _make("fedit", num_examples=[5.0, 9.0, 1.0, 2.0, 7.0])
    init = _init(g)
    server = s.init_server(init, frozen={})
    clients, trained = np.array([0, 2, 3]), _random(3, g)
    w = torch.tensor([5.0, 1.0, 2.0], dtype=torch.float64)
    new = _round(s, server, _state(s, init, 3), clients, trained)
    p = (w / w.sum()).numpy()
    for key in KEYS:
        ref = np.tensordot(p, trained[key].double().numpy(), axes=1)
        np.testing.assert_allclose(new[key][0].numpy(), ref, rtol=1e-6, atol=1e-7)


def test_ffa_lora_never_moves_or_sends_a():
    g = torch.Generator().manual_seed(1)
    s = _make("ffa_lora")
    init = _init(g)
    server = s.init_server(init, frozen={})
    clients = np.array([0, 1])
    exchange = s.configure_train(server, clients, np.arange(5)).exchange
    plan = s.configure_client(server, _state(s, init, 2), clients, Task.TRAIN)
    assert "m.lora_A" not in plan.trainable
    assert "m.lora_A" not in exchange.keys_up() and "m.lora_A" not in exchange.down
    start = plan.start
    torch.testing.assert_close(start["m.lora_A"], init["m.lora_A"].expand(2, 2, 5))
    trained = {**_random(2, g), "m.lora_A": start["m.lora_A"]}
    new = _round(s, server, _state(s, init, 2), clients, trained)
    torch.testing.assert_close(new["m.lora_A"], init["m.lora_A"])
    # exactness: the mean of B_k A equals mean(B_k) A
    dense = (trained["m.lora_B"].double() @ init["m.lora_A"].double()).mean(0)
    torch.testing.assert_close((new["m.lora_B"][0].double() @ init["m.lora_A"][0].double()), dense)


def test_fedsa_lora_shares_a_and_keeps_b_and_head():
    g = torch.Generator().manual_seed(2)
    s = _make("fedsa_lora")
    init = _init(g)
    server = s.init_server(init, frozen={})
    clients = np.array([3, 4])
    assert s.configure_train(server, clients, np.arange(5)).exchange.keys_up() == ["m.lora_A"]
    assert set(s.init_client(init)) == {"m.lora_B", "head.weight", "head.bias"}
    kept = {k: v for k, v in _random(2, g).items() if k != "m.lora_A"}
    start = s.configure_client(server, kept, clients, Task.TRAIN).start
    torch.testing.assert_close(start["m.lora_B"], kept["m.lora_B"])
    torch.testing.assert_close(start["m.lora_A"], server["m.lora_A"].expand(2, 2, 5))
    trained = _random(2, g)
    state, upload = s.finish_client(server, trained, kept, clients)
    assert set(state) == set(kept) and "m.lora_A" in upload
    torch.testing.assert_close(state["m.lora_B"], trained["m.lora_B"])  # the trained B stays with the client
    assert s.global_model(server, _init(g)) is None


def test_cluster_fedit_averages_inside_true_groups_and_equals_fedit_with_one_group():
    g = torch.Generator().manual_seed(3)
    groups = np.array([0, 1, 0, 1, 1])
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    s = _make("cluster_fedit", groups=groups, num_examples=w.numpy())
    init = _init(g)
    server = s.init_server(init, frozen={})
    clients, trained = np.arange(5), _random(5, g)
    new = _round(s, server, {}, clients, trained)
    for c in (0, 1):
        m = groups == c
        ref = np.tensordot(w.numpy()[m] / w.numpy()[m].sum(), trained["m.lora_B"].double().numpy()[m], axes=1)
        np.testing.assert_allclose(new["m.lora_B"][c].numpy(), ref, rtol=1e-6, atol=1e-7)
    start = s.configure_client(new, {}, np.array([1, 2]), Task.TRAIN).start
    torch.testing.assert_close(start["m.lora_B"], new["m.lora_B"][[1, 0]])
    one = _make("cluster_fedit", groups=np.zeros(5, dtype=int), num_examples=w.numpy())
    fed = _make("fedit", num_examples=w.numpy())
    a = _round(one, one.init_server(init, frozen={}), {}, clients, trained)
    b = _round(fed, fed.init_server(init, frozen={}), {}, clients, trained)
    for key in KEYS:
        torch.testing.assert_close(a[key], b[key])


def test_cluster_fedit_without_groups_is_a_clear_error():
    with pytest.raises(ValueError, match="known client groups"):
        _make("cluster_fedit", groups=-np.ones(5, dtype=int))


def test_local_sends_nothing():
    g = torch.Generator().manual_seed(5)
    s = _make("local")
    init = _init(g)
    server = s.init_server(init, frozen={})
    plan = s.configure_train(server, np.arange(5), np.arange(5))
    assert plan.exchange.keys_up() == [] and plan.exchange.down == {} and set(s.init_client(init)) == set(KEYS)
    assert modelled_bytes(plan.exchange, plan.participants, np.full(5, 2), np.ones(5)) == (0, 0)


def test_absent_group_keeps_its_server_state():
    g = torch.Generator().manual_seed(4)
    s = _make("cluster_fedit", groups=np.array([0, 1, 0, 1, 1]))
    server = s.init_server(_init(g), frozen={})
    new = _round(s, server, {}, np.array([0, 2]), _random(2, g))
    torch.testing.assert_close(new["m.lora_B"][1], server["m.lora_B"][1])

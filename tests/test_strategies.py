"""Each strategy's round against a float64 dense implementation written here from its equations."""
import numpy as np
import pytest
import torch

from fedhpc.configtree import build
from fedhpc.runtime.reduce import GroupReduction
from fedhpc.strategies import StrategyConfig, build_strategy, list_strategies

KEYS = {"m.lora_A": (2, 5), "m.lora_B": (3, 2), "head.weight": (4, 3), "head.bias": (4,)}


def _make(name, groups=np.array([0, 1, 0, 1, 1]), **options):
    cfg = build(StrategyConfig, {"name": name, **options})
    return build_strategy(cfg, keys=list(KEYS), groups=groups)


def _round(strategy, server, kept, clients, trained, weights):
    """One server round through the real reduction on a single process."""
    from mpi4py import MPI

    contrib = strategy.contribute(trained, clients, weights)
    reduction = GroupReduction({k: KEYS[k] for k in strategy.sent_up()}, strategy.num_groups())
    reduction.add(contrib)
    reduced, _ = reduction.finish(comm=MPI.COMM_SELF)
    return strategy.aggregate(server, reduced, round_index=1)


def _random(count, g):
    return {k: torch.randn(count, *s, generator=g) for k, s in KEYS.items()}


def _init(g):
    return {k: v[:1] for k, v in _random(1, g).items()}


def test_registry_lists_the_spine_methods():
    assert {"fedit", "ffa_lora", "fedsa_lora", "local", "cluster_fedit"} <= set(list_strategies())


def test_fedit_is_the_weighted_mean_of_every_factor():
    g = torch.Generator().manual_seed(0)
    s = _make("fedit")
    server = s.init_server(_init(g))
    clients, trained = np.array([0, 2, 3]), _random(3, g)
    w = torch.tensor([5.0, 1.0, 2.0], dtype=torch.float64)
    new = _round(s, server, {}, clients, trained, w)
    p = (w / w.sum()).numpy()
    for key in KEYS:
        ref = np.tensordot(p, trained[key].double().numpy(), axes=1)
        np.testing.assert_allclose(new[key][0].numpy(), ref, rtol=1e-6, atol=1e-7)


def test_ffa_lora_never_moves_or_sends_a():
    g = torch.Generator().manual_seed(1)
    s = _make("ffa_lora")
    init = _init(g)
    server = s.init_server(init)
    assert "m.lora_A" not in s.trainable() and "m.lora_A" not in s.sent_up() + s.sent_down()
    start = s.broadcast(server, {}, np.array([0, 1]))
    torch.testing.assert_close(start["m.lora_A"], init["m.lora_A"].expand(2, 2, 5))
    trained = {**_random(2, g), "m.lora_A": start["m.lora_A"]}
    new = _round(s, server, {}, np.array([0, 1]), trained, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(new["m.lora_A"], init["m.lora_A"])
    # exactness: the mean of B_k A equals mean(B_k) A
    dense = (trained["m.lora_B"].double() @ init["m.lora_A"].double()).mean(0)
    torch.testing.assert_close((new["m.lora_B"][0].double() @ init["m.lora_A"][0].double()), dense)


def test_fedsa_lora_shares_a_and_keeps_b_and_head():
    g = torch.Generator().manual_seed(2)
    s = _make("fedsa_lora")
    assert s.sent_up() == ["m.lora_A"] and set(s.kept()) == {"m.lora_B", "head.weight", "head.bias"}
    server = s.init_server(_init(g))
    kept = _random(2, g)
    start = s.broadcast(server, kept, np.array([3, 4]))
    torch.testing.assert_close(start["m.lora_B"], kept["m.lora_B"])
    assert s.global_model(server, _init(g)) is None


def test_cluster_fedit_averages_inside_true_groups_and_equals_fedit_with_one_group():
    g = torch.Generator().manual_seed(3)
    groups = np.array([0, 1, 0, 1, 1])
    s = _make("cluster_fedit", groups=groups)
    server = s.init_server(_init(g))
    clients, trained = np.arange(5), _random(5, g)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    new = _round(s, server, {}, clients, trained, w)
    for c in (0, 1):
        m = groups == c
        ref = np.tensordot(w.numpy()[m] / w.numpy()[m].sum(), trained["m.lora_B"].double().numpy()[m], axes=1)
        np.testing.assert_allclose(new["m.lora_B"][c].numpy(), ref, rtol=1e-6, atol=1e-7)
    start = s.broadcast(new, {}, np.array([1, 2]))
    torch.testing.assert_close(start["m.lora_B"], new["m.lora_B"][[1, 0]])
    one = _make("cluster_fedit", groups=np.zeros(5, dtype=int))
    fed = _make("fedit")
    a = _round(one, one.init_server(_init(g)), {}, clients, trained, w)
    b = _round(fed, fed.init_server(_init(g)), {}, clients, trained, w)
    for key in KEYS:
        torch.testing.assert_close(a[key], b[key])


def test_cluster_fedit_without_groups_is_a_clear_error():
    with pytest.raises(ValueError, match="known client groups"):
        _make("cluster_fedit", groups=-np.ones(5, dtype=int))


def test_local_sends_nothing():
    s = _make("local")
    assert s.sent_up() == [] and s.sent_down() == [] and set(s.kept()) == set(KEYS)


def test_absent_group_keeps_its_server_state():
    g = torch.Generator().manual_seed(4)
    s = _make("cluster_fedit", groups=np.array([0, 1, 0, 1, 1]))
    server = s.init_server(_init(g))
    new = _round(s, server, {}, np.array([0, 2]), _random(2, g), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(new["m.lora_B"][1], server["m.lora_B"][1])

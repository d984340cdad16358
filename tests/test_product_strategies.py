"""The heterogeneous-rank methods' server rounds against float64 dense math written here.

Every reference below forms the dense d_out x d_in products with numpy from the method's
equations (algorithms.md §2.5-2.10, §4); the strategies never form them where they need not.
"""
import numpy as np
import pytest
import torch
from mpi4py import MPI

from fedhpc.configtree import build
from fedhpc.models.ranks import ClientRanks
from fedhpc.runtime.exchange import modelled_bytes
from fedhpc.runtime.reduce import Reduction
from fedhpc.strategies import Population, StrategyConfig, build_strategy
from fedhpc.train.plan import Task

D_IN, D_OUT, R_MAX, ALPHA = 7, 6, 4, 8.0
KEYS = {"m.lora_A": (R_MAX, D_IN), "m.lora_B": (D_OUT, R_MAX), "n.lora_A": (R_MAX, 5), "n.lora_B": (9, R_MAX),
        "head.weight": (3, 5), "head.bias": (3,)}
RANKS = np.array([2, 4, 1, 4, 2])  # client k has rank RANKS[k]
MODULES = {"m": (D_OUT, D_IN), "n": (9, 5)}
NUM_EXAMPLES = np.array([3.0, 1.0, 2.0, 4.0, 5.0])  # client k's samples: the weight of its upload


def _cut(tensors, ranks):
    """Entries beyond each client's rank set to zero by explicit slicing (rows of A, columns of B),
    written here rather than with fedhpc's own mask_to_ranks."""
    out = {}
    for key, t in tensors.items():
        t = t.clone()
        for c, r in enumerate(torch.as_tensor(ranks).tolist()):
            if ".lora_A" in key:  # also a factor's extras (`m.lora_A.cv`)
                t[c, r:] = 0
            elif ".lora_B" in key:
                t[c, :, r:] = 0
        out[key] = t
    return out


def _make(name, ranks=RANKS, seed=0, **options):
    cfg = build(StrategyConfig, {"name": name, **options})
    population = Population(num_examples=NUM_EXAMPLES, groups=np.zeros(len(ranks), dtype=int),
                            ranks=ClientRanks(np.asarray(ranks), ALPHA), seed=seed)
    return build_strategy(cfg, shapes=KEYS, population=population)


def _state(strategy, clients):
    """What these clients hold before their first round, `[C, ...]`."""
    return {k: v.expand(len(clients), *v.shape[1:]).clone() for k, v in strategy.init_client(_init()).items()}


def _round(strategy, server, clients, trained, round_index=1, state=None):
    """One server round through the real reduction (means and gathered rows) on one process."""
    plan = strategy.configure_train(server, clients, clients)
    state = _state(strategy, clients) if state is None else state
    _, upload = strategy.finish_client(server, trained, state, clients)
    reduction = Reduction(plan.exchange, strategy.population.num_examples)
    reduction.add(clients, upload)
    reduced, _ = reduction.finish(comm=MPI.COMM_SELF)
    return strategy.aggregate_train(server, reduced, round_index=round_index)


def _start(strategy, server, clients, state=None):
    """The adapters these clients start a round from."""
    state = _state(strategy, clients) if state is None else state
    return strategy.configure_client(server, state, clients, Task.TRAIN).start


def _trained(clients, seed, ranks=RANKS, garbage=0.0):
    """Random trained adapters cut to rank; `garbage` fills the padded entries instead of 0."""
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(len(clients), *s, generator=g) for k, s in KEYS.items()}
    clean = _cut(out, torch.as_tensor(ranks[clients]))
    return {k: clean[k] + garbage * (out[k] - clean[k]).sign() for k in out}


def _init(seed=0):
    g = torch.Generator().manual_seed(seed)
    init = {k: torch.randn(1, *s, generator=g) for k, s in KEYS.items()}
    init.update({k: torch.zeros(1, *s) for k, s in KEYS.items() if k.endswith("lora_B")})
    return init


def _dense(trained, clients, weights, module, *, scaled=True):
    """Σ_k p_k (s_k) B_k[:, :r_k] A_k[:r_k] in float64."""
    p = weights.numpy() / weights.numpy().sum()
    total = 0.0
    for row, c in enumerate(clients):
        r = RANKS[c]
        b = trained[f"{module}.lora_B"][row].double().numpy()[:, :r]
        a = trained[f"{module}.lora_A"][row].double().numpy()[:r]
        total = total + p[row] * (ALPHA / r if scaled else 1.0) * b @ a
    return total


def _client_product(strategy, server, client, module, *, with_scaling=True):
    """What client `client` starts from, as its effective update s_k B_k A_k (float64)."""
    start = _cut(_start(strategy, server, np.array([client])), torch.as_tensor(RANKS[[client]]))
    s = ALPHA / RANKS[client] if with_scaling else 1.0
    return s * start[f"{module}.lora_B"][0].double().numpy() @ start[f"{module}.lora_A"][0].double().numpy()


CLIENTS = np.array([0, 1, 2, 4])
WEIGHTS = torch.as_tensor(NUM_EXAMPLES[CLIENTS])  # [3, 1, 2, 5]: what the reduction weighs them by


def _close(x, ref, tol=2e-5):
    np.testing.assert_allclose(x, ref, rtol=0, atol=tol * max(1.0, np.abs(ref).max()))


def _head_is_weighted_mean(new, trained):
    p = (WEIGHTS / WEIGHTS.sum()).numpy()
    _close(new["head.weight"][0].numpy(), np.tensordot(p, trained["head.weight"].double().numpy(), axes=1))


def test_flexlora_gives_each_client_the_top_rk_svd_of_the_exact_product():
    s = _make("flexlora")
    trained = _trained(CLIENTS, 1)
    new = _round(s, s.init_server(_init(), frozen={}), CLIENTS, trained)
    for m in MODULES:
        U, S, Vt = np.linalg.svd(_dense(trained, CLIENTS, WEIGHTS, m))
        for c in (2, 0, 1):  # ranks 1, 2, 4
            r = RANKS[c]
            _close(_client_product(s, new, c, m), (U[:, :r] * S[:r]) @ Vt[:r])
    _head_is_weighted_mean(new, trained)


@pytest.mark.parametrize("scaled", [True, False])
def test_ilora_qr_gives_each_rank_the_leading_qr_truncation(scaled):
    s = _make("ilora", scale_across_ranks=scaled)
    trained = _trained(CLIENTS, 2)
    new = _round(s, s.init_server(_init(), frozen={m: torch.randn(*sh) for m, sh in MODULES.items()}),
                 CLIENTS, trained)
    for m in MODULES:
        Q, R = np.linalg.qr(_dense(trained, CLIENTS, WEIGHTS, m, scaled=scaled))  # Householder, as the official code
        for c in (2, 0, 1):
            r = RANKS[c]
            # scaled: the client's s_k B_k A_k is the truncation; official: B_k A_k is (s_k applied on top)
            _close(_client_product(s, new, c, m, with_scaling=scaled), Q[:, :r] @ R[:r])
    _head_is_weighted_mean(new, trained)


def test_ilora_svd_equals_flexlora_with_equal_ranks_and_no_control():
    equal = np.full(5, R_MAX)
    ilora, flex = _make("ilora", ranks=equal, aggregation="svd"), _make("flexlora", ranks=equal)
    trained = _trained(CLIENTS, 3, ranks=equal)
    a = _round(ilora, flex.init_server(_init(), frozen={}), CLIENTS, trained)
    b = _round(flex, flex.init_server(_init(), frozen={}), CLIENTS, trained)
    for key in KEYS:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    for c in CLIENTS:
        start_a, start_b = _start(ilora, a, np.array([c])), _start(flex, b, np.array([c]))
        for key in KEYS:
            torch.testing.assert_close(start_a[key], start_b[key], rtol=1e-5, atol=1e-6)


def test_ilora_qr_init_follows_the_official_code():
    w0 = {m: torch.randn(*sh, generator=torch.Generator().manual_seed(7), dtype=torch.float64) for m, sh in MODULES.items()}
    s = _make("ilora", compensation=0.5, init_scale=1e-2)
    server = s.init_server(_init(), frozen={m: w.float() for m, w in w0.items()})
    for m, (d_out, d_in) in MODULES.items():
        Q, R = np.linalg.qr(w0[m].numpy())
        product = Q[:, :R_MAX] @ R[:R_MAX]
        c = 1e-2 * np.sqrt(d_out * d_in) / np.linalg.norm(product)
        B, A = server[f"{m}.lora_B"][0].double().numpy(), server[f"{m}.lora_A"][0].double().numpy()
        _close(B @ A, c * product, tol=1e-5)
        _close(B.T @ B, c * np.eye(R_MAX), tol=1e-5)  # orthogonal columns of norm sqrt(c)
        _close(server[f"{m}.base_delta"][0].double().numpy(), -0.5 * c * product, tol=1e-5)


def test_ilora_control_variates_are_rank_aware():
    s = _make("ilora", use_control=True, control_population=10)
    clients = np.array([2, 3])  # ranks 1 and 4
    server = s.init_server(_init(), frozen={m: torch.randn(*sh) for m, sh in MODULES.items()})
    g = torch.Generator().manual_seed(4)
    server = {k: (torch.randn(v.shape, generator=g) if k.endswith(".cv") else v) for k, v in server.items()}
    state = {k: torch.randn(2, *v.shape[1:], generator=g) for k, v in s.init_client(_init()).items()}
    state = _cut(state, torch.as_tensor(RANKS[clients]))
    hooks = s.configure_client(server, state, clients, Task.TRAIN).hooks
    steps = [_cut({k: torch.randn(2, *KEYS[k], generator=g) for k in KEYS}, torch.as_tensor(RANKS[clients]))
             for _ in range(3)]
    active = [torch.tensor([True, True]), torch.tensor([True, False]), torch.tensor([True, True])]
    for raw, act in zip(steps, active):
        grads = {k: v.clone() for k, v in raw.items()}
        hooks.grads(grads, {})
        for k in KEYS:  # g + (c - c_k) with c sliced to the client's rank
            corr = _cut({k: server[k + ".cv"].expand(2, *KEYS[k]) - state[k + ".cv"]},
                                 torch.as_tensor(RANKS[clients]))[k]
            torch.testing.assert_close(grads[k], raw[k] + corr)
        hooks.stepped(act)
    out = hooks.results()
    for k in KEYS:
        mean0 = sum(st[k][0] for st in steps) / 3
        mean1 = (steps[0][k][1] + steps[2][k][1]) / 2
        torch.testing.assert_close(out[k + ".dcv"][0], mean0 - state[k + ".cv"][0])
        torch.testing.assert_close(out[k + ".dcv"][1], mean1 - state[k + ".cv"][1])
    assert out["m.lora_A.dcv"][0, 1:].abs().max() == 0  # rank-1 client: padded rows exactly zero
    trained = {**_trained(clients, 5), **out}
    new_state, upload = s.finish_client(server, trained, state, clients)
    torch.testing.assert_close(new_state["m.lora_B.cv"], state["m.lora_B.cv"] + out["m.lora_B.dcv"])
    assert all(k + ".dcv" in upload for k in KEYS)
    new = _round(s, server, clients, trained, state=state)
    for k in KEYS:
        torch.testing.assert_close(new[k + ".cv"], server[k + ".cv"] + out[k + ".dcv"].sum(0, keepdim=True) / 10)


def test_hetlora_is_the_norm_weighted_zero_padded_mean():
    s = _make("hetlora")
    trained = _trained(CLIENTS, 6)
    new = _round(s, s.init_server(_init(), frozen={}), CLIENTS, trained)
    norms = np.array([np.sqrt(sum(np.linalg.norm(trained[f"{m}.lora_B"][i].double().numpy()
                                                 @ trained[f"{m}.lora_A"][i].double().numpy()) ** 2 for m in MODULES))
                      for i in range(len(CLIENTS))])
    w = norms / norms.sum()
    for key in KEYS:
        if "lora" in key:
            _close(new[key][0].numpy(), np.tensordot(w, trained[key].double().numpy(), axes=1))
    _head_is_weighted_mean(new, trained)


def test_hetlora_prunes_a_client_whose_tail_norm_shrank():
    s = _make("hetlora", prune_gamma=0.5)
    server = s.init_server(_init(), frozen={})
    server = {**server, **_trained(np.array([1]), 7)}  # a nonzero server LoRA at r_max
    clients = np.array([1, 3])  # both rank 4: tail = ranks 2..3
    state = _state(s, clients)
    start = _cut(_start(s, server, clients, state), torch.as_tensor(RANKS[clients]))
    trained = {k: v.clone() for k, v in start.items()}
    for m in MODULES:  # client 1 shrinks its tail, client 3 grows it
        trained[f"{m}.lora_B"][0, :, 2:] *= 0.5
        trained[f"{m}.lora_B"][1, :, 2:] *= 2.0
    new, _ = s.finish_client(server, trained, state, clients)
    assert new["hetlora.rank"].view(-1).tolist() == [2.0, 4.0]
    again = _start(s, server, clients, new)
    assert again["m.lora_A"][0, 2:].abs().max() == 0 and again["m.lora_A"][1, 2:].abs().max() > 0
    # the penalty is the tail's Frobenius norm of B A, summed over modules in squares
    ref = np.sqrt(sum(np.linalg.norm(trained[f"{m}.lora_B"][1, :, 2:].double().numpy()
                                     @ trained[f"{m}.lora_A"][1, 2:].double().numpy()) ** 2 for m in MODULES))
    np.testing.assert_allclose(s.tail_norm(trained, torch.tensor([4, 4]))[1].item(), ref, rtol=1e-5)


def test_fedex_lora_merged_weight_is_the_exact_weighted_product():
    s = _make("fedex_lora")
    server = s.init_server(_init(), frozen={})
    g = torch.Generator().manual_seed(8)
    server.update({f"{m}.base_delta": torch.randn(1, *sh, generator=g) for m, sh in MODULES.items()})  # a later round
    trained = _trained(CLIENTS, 9)
    new = _round(s, server, CLIENTS, trained)
    p = (WEIGHTS / WEIGHTS.sum()).numpy()
    for m in MODULES:
        merged = new[f"{m}.base_delta"][0].double().numpy() + ALPHA / R_MAX * (
            new[f"{m}.lora_B"][0].double().numpy() @ new[f"{m}.lora_A"][0].double().numpy())
        _close(merged, server[f"{m}.base_delta"][0].double().numpy() + _dense(trained, CLIENTS, WEIGHTS, m), tol=1e-6)
        _close(new[f"{m}.lora_A"][0].numpy(), np.tensordot(p, trained[f"{m}.lora_A"].double().numpy(), axes=1))
    global_model = s.global_model(new, _init())
    assert "m.base_delta" in global_model and "m.base_delta" in _start(s, new, CLIENTS)


@pytest.mark.parametrize("equal,scaled", [(True, False), (False, False), (False, True)])
def test_lora_fair_corrects_b_by_ridge_least_squares(equal, scaled):
    ranks = np.full(5, R_MAX) if equal else RANKS
    s = _make("lora_fair", ranks=ranks, lambda_reg=0.05, scale_across_ranks=scaled)
    trained = _trained(CLIENTS, 10, ranks=ranks)
    new = _round(s, s.init_server(_init(), frozen={}), CLIENTS, trained)
    p = (WEIGHTS / WEIGHTS.sum()).numpy()
    weight = [p[i] * (R_MAX / ranks[c] if scaled else 1.0) for i, c in enumerate(CLIENTS)]  # (s_k / s_max)
    for m in MODULES:
        A = np.tensordot(p, trained[f"{m}.lora_A"].double().numpy(), axes=1)  # padded entries are zero
        B = np.tensordot(p, trained[f"{m}.lora_B"].double().numpy(), axes=1)
        target = sum(weight[i] * trained[f"{m}.lora_B"][i].double().numpy() @ trained[f"{m}.lora_A"][i].double().numpy()
                     for i in range(len(CLIENTS)))
        delta = (target - B @ A) @ A.T @ np.linalg.inv(A @ A.T + 0.05 * np.eye(R_MAX))
        _close(new[f"{m}.lora_B"][0].numpy(), B + delta)
        _close(new[f"{m}.lora_A"][0].numpy(), A)


def test_flora_merges_the_stack_and_restarts_from_fresh_lora():
    s = _make("flora")
    server = s.init_server(_init(), frozen={})
    trained = _trained(CLIENTS, 11)
    new = _round(s, server, CLIENTS, trained, round_index=3)
    for m in MODULES:
        _close(new[f"{m}.base_delta"][0].double().numpy(), _dense(trained, CLIENTS, WEIGHTS, m))
        assert new[f"{m}.lora_B"].abs().max() == 0
        assert not torch.equal(new[f"{m}.lora_A"], server[f"{m}.lora_A"])
    again = _round(s, server, CLIENTS, trained, round_index=3)
    torch.testing.assert_close(again["m.lora_A"], new["m.lora_A"], rtol=0, atol=0)  # same draw on every rank
    other = _round(_make("flora", seed=1), server, CLIENTS, trained, round_index=3)  # keyed by the experiment seed
    assert not torch.equal(other["m.lora_A"], new["m.lora_A"])
    keep = _make("flora", reinit="initial")
    torch.testing.assert_close(_round(keep, server, CLIENTS, trained)["m.lora_A"], server["m.lora_A"])
    # every participant receives the whole stack: rank Σ r_k of the round's participants
    exchange = s.configure_train(server, CLIENTS, np.arange(5)).exchange
    stack = RANKS[CLIENTS].sum()
    assert (exchange.down_ranks[CLIENTS] == stack).all()
    lora = sum(stack * (d_in + d_out) for d_out, d_in in MODULES.values())
    _, down = modelled_bytes(exchange, CLIENTS, RANKS, NUM_EXAMPLES)
    assert down == len(CLIENTS) * (lora + 3 * 5 + 3) * 4


@pytest.mark.parametrize("name", ["flexlora", "ilora", "hetlora", "fedex_lora", "lora_fair", "flora"])
def test_padded_entries_never_leak_into_aggregation(name):
    s = _make(name)
    kwargs = {"frozen": {m: torch.randn(*sh) for m, sh in MODULES.items()}} if name == "ilora" else {}
    server = s.init_server(_init(), **{"frozen": {}, **kwargs})
    clean = _round(s, server, CLIENTS, _trained(CLIENTS, 12))
    dirty = _round(s, server, CLIENTS, _trained(CLIENTS, 12, garbage=1e3))
    for key in clean:
        torch.testing.assert_close(clean[key], dirty[key], rtol=0, atol=0)

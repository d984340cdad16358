"""FedGaLore and fedavg_full (algorithms.md §7, §2.13-2.14) against independent references."""
import pytest
import torch

from fedhpc.models.cohort import client_delta_key, factored_keys
from test_cohort_variants import CLIENTS, ROWS, TARGETS, TOKENS, _adapters, _leaves, _model


def test_dense_client_delta_is_a_per_client_weight_update_and_its_gradient_is_the_full_gradient():
    """`<m>.client_delta` [C, d_out, d_in]: y = x (W0 + ΔW_c)ᵀ + b, against per-client float64 linear algebra."""
    model, frozen = _model()
    adapters = _adapters(model, {"factored"})
    g = torch.Generator().manual_seed(5)
    for name in TARGETS:
        adapters[client_delta_key(name)] = 0.4 * torch.randn(CLIENTS, *frozen[name][0].shape, generator=g,
                                                             dtype=torch.float64)
    x = torch.randn(CLIENTS * ROWS, TOKENS, 5, generator=g, dtype=torch.float64)
    ours_in = _leaves(adapters)
    ours = model(x, ours_in).view(CLIENTS, ROWS, -1)
    ref_in = _leaves(adapters)
    logits = []
    for c in range(CLIENTS):                                  # each client's dense weights, one at a time
        h = x[c * ROWS:(c + 1) * ROWS]
        for name in TARGETS:
            w0, b0 = frozen[name]
            key_a, key_b = factored_keys(name)
            w = w0 + ref_in[client_delta_key(name)][c] + ref_in[key_b][c] @ ref_in[key_a][c]
            h = h @ w.T + b0
            h = torch.tanh(h) if name == "fc1" else h
        logits.append(h.mean(1) @ ref_in["head.weight"][c].T + ref_in["head.bias"][c])
    ref = torch.stack(logits)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    probe = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (ours * probe).sum().backward()
    (ref * probe).sum().backward()
    for k in adapters:
        torch.testing.assert_close(ours_in[k].grad, ref_in[k].grad, rtol=1e-10, atol=1e-12, msg=k)


# --- the server: exact aggregation and the synchronised state ---------------------------------------
import copy  # noqa: E402

import numpy as np  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from mpi4py import MPI  # noqa: E402

from fedhpc.configtree import build  # noqa: E402
from fedhpc.models.cohort import base_delta_key  # noqa: E402
from fedhpc.models.ranks import ClientRanks  # noqa: E402
from fedhpc.runtime.reduce import Reduction  # noqa: E402
from fedhpc.strategies import Population, StrategyConfig, build_strategy  # noqa: E402
from fedhpc.strategies import fedavg_full, fedgalore  # noqa: E402,F401  (registration)
from fedhpc.strategies.ajive import ajive, joint_profile  # noqa: E402
from fedhpc.train.plan import Task  # noqa: E402

# one right-projected module (d_out >= d_in) and one left-projected (d_out < d_in)
SHAPES = {"tall.lora_A": (3, 5), "tall.lora_B": (12, 3), "wide.lora_A": (3, 9), "wide.lora_B": (4, 3),
          "head.weight": (4, 6), "head.bias": (4,)}
NUM_EXAMPLES = np.array([5.0, 9.0, 1.0, 2.0, 7.0, 3.0])


def _make(name, **options):
    cfg = build(StrategyConfig, {"name": name, **options})
    population = Population(num_examples=NUM_EXAMPLES, groups=np.zeros(6, dtype=np.int64),
                            ranks=ClientRanks(np.full(6, 3), 6.0), seed=3)
    return build_strategy(cfg, shapes=SHAPES, population=population)


def _init(g):
    return {k: torch.randn(1, *s, generator=g) for k, s in SHAPES.items()}


def _reduce(strategy, server, clients, trained, state=None):
    """One round's upload through the real reduction on one process; returns the new server state."""
    plan = strategy.configure_train(server, clients, clients)
    state = state or {}
    _, upload = strategy.finish_client(server, trained, state, clients)
    reduction = Reduction(plan.exchange, strategy.population.num_examples)
    reduction.add(clients, upload)
    reduced, _ = reduction.finish(comm=MPI.COMM_SELF)
    return strategy.aggregate_train(server, reduced, round_index=1), plan


def _galore_trained(strategy, server, clients, g):
    """What a pass's training hands `finish_client`: random factors and moments of the plan's shapes."""
    plan = strategy.configure_client(server, {}, clients, Task.TRAIN)
    trained = {k: torch.randn_like(v) if v.shape[0] == len(clients) else v for k, v in plan.start.items()}
    for k, v in plan.opt_state.items():
        trained[f"optimizer.{k}"] = v.clone() if k == "step" else torch.rand_like(v) + 0.1
    for side in strategy.sides:  # the hooks' results: Adam's debiased moment estimates
        for moment in ("m_hat", "v_hat"):
            trained[f"{side.module}.{moment}"] = torch.rand_like(plan.opt_state[f"{side.module}.exp_avg"]) + 0.1
    return trained


@pytest.mark.parametrize("sync", ["s0", "s1", "s2"])
def test_fedgalore_server_adds_the_weighted_mean_of_the_clients_dense_updates(sync):
    g = torch.Generator().manual_seed(0)
    s = _make("fedgalore", sync=sync)
    server = s.init_server(_init(g), frozen={})
    clients = np.array([0, 2, 3, 5])
    trained = _galore_trained(s, server, clients, g)
    new, plan = _reduce(s, server, clients, trained)
    p = torch.tensor(NUM_EXAMPLES[clients] / NUM_EXAMPLES[clients].sum())
    for m in ("tall", "wide"):
        want = sum(p[c] * trained[f"{m}.update_B"][c].double() @ trained[f"{m}.update_A"][c].double()
                   for c in range(len(clients)))
        torch.testing.assert_close(new[base_delta_key(m)][0].double(), want, rtol=1e-5, atol=1e-6)
    want_head = sum(p[c] * trained["head.weight"][c].double() for c in range(len(clients)))
    torch.testing.assert_close(new["head.weight"][0].double(), want_head, rtol=1e-5, atol=1e-6)
    # bytes up: Z, P, V (unless s0) and the head, in float32, per client
    q, r = s.q, s.r
    per_client = (12 * q + 5 * q) + (4 * q + 9 * q) + 4 * 6 + 4 + (0 if sync == "s0" else 12 * r + 9 * r)
    assert int(plan.exchange.blocks["update"].bytes_up[0]) + 4 * (4 * 6 + 4) == 4 * per_client  # + head block
    if sync == "s1":  # the next round's shared projector: top-r singular vectors of this ΔW
        for m, right in (("tall", True), ("wide", False)):
            U, _, Vh = np.linalg.svd(new[base_delta_key(m)][0].double().numpy())
            want_P = Vh[:r] if right else U[:, :r].T
            got = new[f"{m}.P_shared"][0].double().numpy()
            got = got if right else got.T
            np.testing.assert_allclose(got.T @ got, want_P.T @ want_P, atol=1e-4)  # same subspace


def test_fedgalore_s1_averages_v_only_under_a_shared_projector():
    g = torch.Generator().manual_seed(1)
    s = _make("fedgalore", sync="s1", sync_first_moment=True)
    server = s.init_server(_init(g), frozen={})
    clients = np.array([1, 4])
    first, _ = _reduce(s, server, clients, _galore_trained(s, server, clients, g))
    assert float(first["galore.warm"][0]) == 0 and first["tall.v_sync"].abs().sum() == 0  # own frames: no mean
    plan = s.configure_client(first, {}, clients, Task.TRAIN)
    torch.testing.assert_close(plan.start["tall.update_A"][:, :s.r], first["tall.P_shared"].expand(2, -1, -1))
    torch.testing.assert_close(plan.start["wide.update_B"][:, :, :s.r], first["wide.P_shared"].expand(2, -1, -1))
    trained = _galore_trained(s, first, clients, g)
    second, _ = _reduce(s, first, clients, trained)
    p = torch.tensor(NUM_EXAMPLES[clients] / NUM_EXAMPLES[clients].sum())
    for key, moment in (("v_sync", "v_hat"), ("m_sync", "m_hat")):
        want = sum(p[c] * trained[f"tall.{moment}"][c].double() for c in range(2))
        torch.testing.assert_close(second[f"tall.{key}"][0].double(), want, rtol=1e-5, atol=1e-6)
    plan = s.configure_client(second, {}, clients, Task.TRAIN)
    torch.testing.assert_close(plan.opt_state["wide.exp_avg_sq"], second["wide.v_sync"].expand(2, -1, -1))


def test_fedgalore_s2_profile_is_the_joint_part_of_the_root_moments():
    g = torch.Generator().manual_seed(2)
    s = _make("fedgalore", sync="s2")
    server = s.init_server(_init(g), frozen={})
    clients = np.array([0, 1, 2, 3, 4])
    trained = _galore_trained(s, server, clients, g)
    new, _ = _reduce(s, server, clients, trained)
    p = torch.tensor(NUM_EXAMPLES[clients] / NUM_EXAMPLES[clients].sum())
    for m, right in (("tall", True), ("wide", False)):
        V = trained[f"{m}.v_hat"].double()
        X = (V if right else V.transpose(1, 2)).sqrt()                  # rows: the shared coordinates
        joint = ajive(X, signal_rank=s.r)
        profile = sum(p[c] * (joint.basis @ joint.basis.T @ X[c]).square().mean(1) for c in range(5))
        torch.testing.assert_close(new[f"{m}.v_sync"][0].double(), profile, rtol=1e-5, atol=1e-7)
        plan = s.configure_client(new, {}, clients[:2], Task.TRAIN)
        v0 = plan.opt_state[f"{m}.exp_avg_sq"]
        want = new[f"{m}.v_sync"][0].view(-1, 1) if right else new[f"{m}.v_sync"][0].view(1, -1)
        torch.testing.assert_close(v0, want.expand_as(v0))


def test_fedgalore_s2_without_joint_signal_keeps_adam_cold():
    """A joint rank of 0 (here: θ = K, which only a direction every block holds exactly reaches)
    leaves no profile: V restarts at zero with Adam's bias correction, never at zero without it."""
    g = torch.Generator().manual_seed(5)
    s = _make("fedgalore", sync="s2", ajive_delta=0.0)
    server = s.init_server(_init(g), frozen={})
    clients = np.array([0, 1, 2])
    new, _ = _reduce(s, server, clients, _galore_trained(s, server, clients, g))
    assert new["galore.joint_rank"].tolist() == [0.0, 0.0] and new["galore.warm"].tolist() == [0.0, 0.0]
    plan = s.configure_client(new, {}, clients, Task.TRAIN)
    assert plan.opt_state["tall.exp_avg_sq"].abs().sum() == 0
    assert plan.hooks.warm == {"tall": (False, False), "wide": (False, False)}


def test_fedavg_full_server_adds_the_weighted_mean_of_dense_updates():
    g = torch.Generator().manual_seed(3)
    s = _make("fedavg_full")
    server = s.init_server(_init(g), frozen={})
    clients = np.array([0, 3, 4])
    plan = s.configure_client(server, {}, clients, Task.TRAIN)
    trained = {k: (torch.randn_like(v) if v.shape[0] == 3 else v) for k, v in plan.start.items()}
    new, round_plan = _reduce(s, server, clients, trained)
    p = torch.tensor(NUM_EXAMPLES[clients] / NUM_EXAMPLES[clients].sum())
    for m in ("tall", "wide"):
        want = sum(p[c] * trained[f"{m}.client_delta"][c].double() for c in range(3))
        torch.testing.assert_close(new[base_delta_key(m)][0].double(), want, rtol=1e-6, atol=1e-7)
    up = sum(int(np.prod(shape)) for shape in round_plan.exchange.blocks["dense"].keys.values())
    assert up == 12 * 5 + 4 * 9 + 4 * 6 + 4


# --- AJIVE ------------------------------------------------------------------------------------------
def _planted_blocks(joint_rank, *, K=6, m=60, c=5, individual=2, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(m, max(joint_rank, 1), generator=g, dtype=torch.float64)).Q[:, :joint_rank]
    blocks = []
    for _ in range(K):
        own = torch.linalg.qr(torch.randn(m, individual, generator=g, dtype=torch.float64)).Q
        x = 3 * basis @ torch.randn(joint_rank, c, generator=g, dtype=torch.float64)
        x = x + 2 * own @ torch.randn(individual, c, generator=g, dtype=torch.float64)
        blocks.append(x + noise * torch.randn(m, c, generator=g, dtype=torch.float64))
    return torch.stack(blocks), basis


@pytest.mark.parametrize("threshold", ["fixed", "wedin"])
@pytest.mark.parametrize("joint_rank", [0, 1, 2])
def test_ajive_recovers_a_planted_joint_rank_and_basis(joint_rank, threshold):
    blocks, basis = _planted_blocks(joint_rank)
    found = ajive(blocks, signal_rank=joint_rank + 2, threshold=threshold, samples=300,
                  generator=torch.Generator().manual_seed(1))
    assert found.rank == joint_rank, (found.sv2[:4], found.threshold)
    if joint_rank:
        cosines = np.linalg.svd(basis.numpy().T @ found.basis.numpy(), compute_uv=False)
        assert cosines.min() > 0.995, cosines                          # principal angles below ~6 degrees
    weights = torch.rand(6, dtype=torch.float64)
    projected = found.basis @ found.basis.T @ blocks
    torch.testing.assert_close(joint_profile(blocks, weights, found),
                               (weights.view(-1, 1) * projected.square().mean(-1)).sum(0))


# --- the client: GaLore in projected coordinates against dense float64 GaLore ----------------------
from fedhpc.assemble import assemble  # noqa: E402
from fedhpc.clients import train_pass  # noqa: E402
from fedhpc.config import load_config  # noqa: E402
from fedhpc.train.local import client_batches  # noqa: E402

from conftest import REPO, TINY  # noqa: E402


def _dense_galore(run, server, client, *, rank, refresh, windows, right_of, v0, warm, bias, scale):
    """One client's local GaLore, written densely in float64 from algorithms.md §2.13 / §7.3: W is a
    dense leaf, G its autograd gradient, P from numpy's SVD of G, R = G Pᵀ (right) or Pᵀ G (left),
    Adam on R, W <- W - lr α_g N P; the head takes torch.optim.AdamW. Each singular vector is signed so
    that its largest entry is positive (the moments carry over a refresh, so the sign matters).
    Returns ΔW per module, the Ps, and the debiased second moment V / c2 of the last step."""
    cfg = run.cfg
    model = copy.deepcopy(run.model).double()
    opt_cfg = cfg.train.optimizer
    (b1, b2), eps, lr = opt_cfg.betas, opt_cfg.eps, opt_cfg.lr
    modules = [k[:-len(".base_delta")] for k in server if k.endswith(".base_delta")]
    W = {m: server[base_delta_key(m)].double().clone() for m in modules}
    delta = {m: torch.zeros_like(W[m][0]) for m in modules}
    head = {k: server[k][:1].double().clone().requires_grad_(True) for k in ("head.weight", "head.bias")}
    head_opt = torch.optim.AdamW(list(head.values()), lr=lr, betas=(b1, b2), eps=eps,
                                 weight_decay=opt_cfg.weight_decay)
    P, M, V, V_hat, projectors = {}, {}, {}, {}, {m: [] for m in modules}
    for m in modules:
        shape = (W[m].shape[1], rank) if right_of[m] else (rank, W[m].shape[2])
        M[m] = torch.zeros(shape, dtype=torch.float64)
        V[m] = v0[m].double().clone() if v0 is not None else torch.zeros(shape, dtype=torch.float64)
    batches = client_batches(run.data.client_train[client], seed=cfg.seed, client=client, round_index=1,
                             cfg=cfg.train)
    for t, rows in enumerate(batches, start=1):
        leaves = {m: (W[m] + delta[m]).requires_grad_(True) for m in modules}
        adapters = {**head, **{base_delta_key(m): leaves[m] for m in modules}}
        logits = model(run.data.train_x[torch.from_numpy(rows)].double(), adapters)
        loss = F.cross_entropy(logits, run.data.train_y[torch.from_numpy(rows)])
        grads = torch.autograd.grad(loss, [leaves[m] for m in modules] + list(head.values()))
        for h, g in zip(head.values(), grads[len(modules):]):
            h.grad = g
        head_opt.step()
        for m, G in zip(modules, grads):
            G = G[0]
            if t == 1 or (refresh and (t - 1) % refresh == 0 and (t - 1) // refresh < windows):
                U, _, Vh = np.linalg.svd(G.numpy())
                P[m] = torch.from_numpy(Vh[:rank] if right_of[m] else U[:, :rank].T)  # [r, n] or [r, m]
                P[m] = P[m] * torch.sign(P[m].gather(1, P[m].abs().argmax(1, keepdim=True)))  # largest entry > 0
                P[m] = P[m] if right_of[m] else P[m].T
                projectors[m].append(P[m])
            R = G @ P[m].T if right_of[m] else P[m].T @ G
            M[m] = b1 * M[m] + (1 - b1) * R
            V[m] = b2 * V[m] + (1 - b2) * R * R
            c1 = 1 - b1 ** t
            c2 = 1.0 if (warm and bias == "warm") else 1 - b2 ** t
            N = (M[m] / c1) / ((V[m] / c2).sqrt() + eps)
            delta[m] = delta[m] - lr * scale * (N @ P[m] if right_of[m] else P[m] @ N)
            V_hat[m] = V[m] / c2
    return delta, projectors, V_hat


CASES = {
    "cold-round": dict(options={"sync": "s0", "bias_correction": "round"}, extra=[]),
    "warm-profile": dict(options={"sync": "s2", "scale": 2.0}, extra=[]),
    "refresh-left": dict(options={"sync": "s2", "projectors": 2, "refresh_steps": 2, "rank": 3},
                         extra=["lora.target_modules=[qkv, fc2]", "train.local_steps=5"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_projected_adam_equals_dense_galore_in_float64(case):
    options, extra = CASES[case]["options"], CASES[case]["extra"]
    cfg = load_config(REPO / "configs/quickstart.yaml",
                      TINY + ["strategy.name=fedgalore", "train.optimizer.lr=0.02", "out_dir=/nonexistent", *extra]
                      + [f"strategy.{k}={v}" for k, v in options.items()])
    run = assemble(cfg, MPI.COMM_SELF)
    s = run.strategy
    server = s.init_server(run.init, frozen=run.model.frozen_weights())
    g = torch.Generator().manual_seed(4)
    for side in s.sides:                     # a trained global model and (warm) a synchronised profile
        key = base_delta_key(side.module)
        server[key] = 0.05 * torch.randn(server[key].shape, generator=g)
    warm = options["sync"] != "s0"
    if warm:
        server["galore.warm"] = torch.ones(len(s.sides))
        for side in s.sides:
            server[f"{side.module}.v_sync"] = 1e-4 * torch.rand(server[f"{side.module}.v_sync"].shape, generator=g)
    clients = np.array([0, 1, 3])
    plan = s.configure_client(server, {}, clients, Task.TRAIN)
    train_pass(run, plan, clients, task=Task.TRAIN, round_index=1)
    right_of = {side.module: side.right for side in s.sides}
    assert any(not r for r in right_of.values()) == (case == "refresh-left")
    for c, client in enumerate(clients):
        v0 = None if not warm else {side.module: plan.opt_state[f"{side.module}.exp_avg_sq"][c] * 0 +
                                    (server[f"{side.module}.v_sync"][0].view(-1, 1) if side.right else
                                     server[f"{side.module}.v_sync"][0].view(1, -1)) for side in s.sides}
        want, projectors, v_hat = _dense_galore(run, server, int(client), rank=s.r, refresh=s.cfg.refresh_steps,
                                         windows=s.cfg.projectors, right_of=right_of, v0=v0, warm=warm,
                                         bias=s.cfg.bias_correction, scale=s.cfg.scale)
        for side in s.sides:
            m = side.module
            got = (plan.start[f"{m}.update_B"][c] @ plan.start[f"{m}.update_A"][c]).double()
            scale = want[m].abs().max()
            assert scale > 0
            # float32 training against float64: most updates agree to ~1e-6 of their largest entry, two
            # to 1.2e-4 and 2.9e-4 on an AVX-512 CPU (Adam's normalised step magnifies the rounding of
            # a tiny projected gradient); a wrong step misses by far more: beta2 0.99 or the bias
            # correction off by a step put every update off by > 0.3 of its largest entry, eps 1e-6 some by 0.11
            torch.testing.assert_close(got, want[m], rtol=0, atol=1e-3 * float(scale), msg=f"{case} {m} c{client}")
            fixed = plan.start[side.fixed][c].double()
            for j, P in enumerate(projectors[m]):    # each window's projector: the same subspace
                mine = fixed[j * s.r:(j + 1) * s.r] if side.right else fixed[:, j * s.r:(j + 1) * s.r].T
                ref = P if side.right else P.T
                torch.testing.assert_close(mine.T @ mine, ref.T @ ref, rtol=0, atol=1e-4)
            assert len(projectors[m]) == s.cfg.projectors
            results = plan.hooks.results()[f"{m}.v_hat"][c].double()   # what the client uploads for the sync
            torch.testing.assert_close(results, v_hat[m], rtol=2e-3, atol=1e-9)


# --- the planted setting: a full-rank teacher update under label skew ------------------------------
from fedhpc.data import build_federated_data  # noqa: E402
from fedhpc.models.backbone import build_cohort_model  # noqa: E402
from fedhpc.models.teacher import _teacher_adapters, plant_backbone_teacher  # noqa: E402


def test_planted_teacher_with_a_full_rank_root_under_dirichlet_label_skew():
    skewed = ["data.planted.root_rank=4096", "data.planted.cluster_strength=0", "data.planted.client_strength=0",
              "data.planted.samples_per_client=40"]
    cfg = load_config(REPO / "configs/quickstart.yaml", TINY + skewed + ["data.planted.label_skew=0.1"])
    data = build_federated_data(cfg.data, num_clients=cfg.num_clients, seed=cfg.seed)
    model = build_cohort_model(cfg.model, cfg.lora, num_classes=data.num_classes, seed=cfg.seed)
    root = _teacher_adapters(model, data.groups, np.arange(1), cfg.data.planted, cfg.seed, root_only=True)
    for name, w0 in model.frozen_weights().items():  # the root update has full rank: no rank-4 LoRA holds it
        update = root[f"{name}.lora_B"][0].double() @ root[f"{name}.lora_A"][0].double()
        assert torch.linalg.matrix_rank(update) == min(w0.shape), name
    skew = plant_backbone_teacher(model, data, cfg=cfg.data.planted, seed=cfg.seed)
    plain_cfg = load_config(REPO / "configs/quickstart.yaml", TINY + skewed)
    plain = plant_backbone_teacher(model, data, cfg=plain_cfg.data.planted, seed=cfg.seed)
    assert torch.equal(skew.train_y, plain.train_y) and torch.equal(skew.test_y, plain.test_y)  # same labels
    assert np.array_equal(np.sort(np.concatenate(skew.client_train)), np.arange(len(skew.train_y)))  # a partition
    assert min(len(ix) for ix in skew.client_train) >= 2

    def top_share(parts, y):
        return np.mean([np.bincount(y[ix].numpy(), minlength=10).max() / len(ix) for ix in parts])

    assert top_share(skew.client_train, skew.train_y) > top_share(plain.client_train, plain.train_y) + 0.25
    for train, test in zip(skew.client_train, skew.client_test):   # local tests follow the training mix
        assert set(skew.test_y[test].tolist()) <= set(skew.train_y[train].tolist())


# --- runs: resume, rank count, refusals ---------------------------------------------------------------
import json  # noqa: E402
import shutil  # noqa: E402

from fedhpc.cli import main  # noqa: E402
from fedhpc.experiment import run as run_experiment  # noqa: E402
from fedhpc.io.checkpoint import find_resumable  # noqa: E402

from conftest import mpiexec  # noqa: E402
from test_checkpoint import _assert_same_run  # noqa: E402
from test_experiment import _close  # noqa: E402

# every piece of carried state: AJIVE's profile (Wedin cut, keyed resamples), two projectors a round
# (randomized, keyed sketches), the per-client step counter of the global bias correction
CARRIED = ["strategy.name=fedgalore", "strategy.ajive_threshold=wedin", "strategy.ajive_samples=50",
           "strategy.projectors=2", "strategy.refresh_steps=2", "strategy.svd=randomized",
           "strategy.bias_correction=global", "strategy.profile_ema=0.5", "train.local_steps=4"]


def test_resume_mid_run_equals_the_uninterrupted_run(tmp_path):
    overrides = TINY + CARRIED + ["rounds=3", "checkpoint.keep=3", "sampling.fraction=0.7"]
    run_experiment(load_config(REPO / "configs/quickstart.yaml", overrides + [f"out_dir={tmp_path / 'a'}"]),
                   comm=MPI.COMM_SELF, progress=False)
    full, part = tmp_path / "a" / "quickstart", tmp_path / "b" / "quickstart"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints/round-000002.h5", part / "checkpoints")
    shutil.copy(full / "config.yaml", part)
    run_experiment(load_config(REPO / "configs/quickstart.yaml", overrides + [f"out_dir={tmp_path / 'b'}"]),
                   comm=MPI.COMM_SELF, progress=False, resume=find_resumable(part, comm=MPI.COMM_SELF))
    _assert_same_run(part, full)


@pytest.mark.slow  # ~3 minutes on the shared 2-core machine (9 MPI launches); the golden cases cover 1-4 ranks too
@pytest.mark.parametrize("method", [CARRIED, ["strategy.name=fedgalore", "strategy.sync=s1"],
                                    ["strategy.name=fedavg_full"]], ids=["fedgalore-s2", "fedgalore-s1", "fedavg_full"])
def test_rank_count_changes_no_result(method, tmp_path):
    summaries = {}
    for n in (1, 2, 4):
        proc = mpiexec(n, ["run", str(REPO / "configs/quickstart.yaml"), *TINY, f"out_dir={tmp_path / f'n{n}'}",
                           *method, "--quiet", "sampling.fraction=0.7", "train.clients_per_pass=2"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        summaries[n] = json.loads((tmp_path / f"n{n}" / "quickstart" / "summary.json").read_text())
    _close(summaries[1], summaries[2])
    _close(summaries[1], summaries[4])


def test_fedavg_full_refuses_in_one_line_when_it_cannot_fit(tmp_path, capsys):
    code = main(["run", str(REPO / "configs/quickstart.yaml"), *TINY, f"out_dir={tmp_path}",
                 "strategy.name=fedavg_full", "strategy.memory_limit_gb=0.0001", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "fedavg_full needs at least" in err, err
    assert not (tmp_path / "quickstart" / "metrics.jsonl").exists()               # before any training


@pytest.mark.parametrize("options, key", [
    ({"keep_optimizer_state": True}, "keep_optimizer_state"),
    ({"projectors": 2}, "refresh_steps"),
    ({"sync": "s1", "projectors": 2, "refresh_steps": 3}, "projectors=1"),
    ({"sync": "s2", "sync_first_moment": True}, "sync_first_moment"),
    ({"profile_ema": 1.0}, "profile_ema"),
    ({"rank": 6}, "strategy.rank=6"),
])
def test_bad_fedgalore_options_are_one_line_errors(options, key):
    with pytest.raises(ValueError, match=key) as err:
        _make("fedgalore", **options)
    assert "\n" not in str(err.value)

"""Local training paths not covered by test_local_train.py, each against a reference written here:
peft + torch's own AdamW per client (tier masks, LoRA dropout, a kept optimizer state), brute force
(batch plans, pass splitting), and a second pass grouping (`train.clients_per_pass`)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

from conftest import REPO, TINY
from test_local_train import MODEL, _peft_client
from fedhpc.models.backbone import build_cohort_model
from fedhpc.models.config import LoraConfig
from fedhpc.models.dropout import client_keys, keyed_dropout
from fedhpc.strategies.hilora_tiers import CLUSTER, TierHooks
from fedhpc.train.local import LocalHooks, TrainConfig, client_batches, local_train, split_passes
from fedhpc.train.optim import OptimConfig, StackedOptimizer

R = 2  # HiLoRA tier rank: the model holds 3R


def _data(seed=0, n=60):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 5, (n,), generator=g), g


# --- HiLoRA's tier masks, through the real local training loop ------------------------------------
def test_tier_masks_hold_through_local_train_for_gradients_clipping_and_weight_decay():
    """Cluster tier active, head frozen (leaf_trains_head=False's hooks): local_train must equal a torch
    AdamW per client whose frozen entries get no gradient before clipping and are put back after each
    step (weight decay moves nothing frozen), with the orthogonality penalty written out here."""
    cohort = build_cohort_model(MODEL, LoraConfig(r=3 * R, lora_alpha=6 * R, target_modules=["qkv", "fc1"]),
                                num_classes=5, seed=0)
    x, y, g = _data(1)
    indices = [np.arange(0, 20), np.arange(20, 31), np.arange(31, 60)]
    ids = np.array([2, 5, 7])
    opt_cfg = OptimConfig(name="adamw", lr=2e-2, weight_decay=0.2)
    cfg = TrainConfig(local_epochs=1, batch_size=8, optimizer=opt_cfg, max_grad_norm=0.05)
    adapters = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in cohort.init_adapters(3, g).items()}
    start = {k: v.clone() for k, v in adapters.items()}
    modules = [k[:-len(".lora_A")] for k in adapters if k.endswith(".lora_A")]
    hooks = TierHooks(modules, R, CLUSTER, gamma_cluster=0.5, gamma_leaf=0.5, train_head=False)
    trainable = list(adapters)
    local_train(cohort, adapters=adapters, opt_state=StackedOptimizer(opt_cfg).init_state(adapters),
                trainable=trainable, x=x, y=y, client_ids=ids, client_indices=indices, seed=4, round_index=3,
                cfg=cfg, hooks=hooks)
    live = slice(R, 2 * R)
    for k, c in enumerate(ids):
        model, params = _peft_client({n: v[k] for n, v in start.items()}, 3 * R, 6 * R)
        lora = {n: p for n, p in params.items() if ".lora_" in n}  # the head is frozen: not in the optimizer
        opt = torch.optim.AdamW(lora.values(), lr=opt_cfg.lr, betas=opt_cfg.betas, eps=opt_cfg.eps,
                                weight_decay=opt_cfg.weight_decay)
        frozen = {}
        for n, p in lora.items():
            keep = torch.zeros_like(p, dtype=torch.bool)
            if n.endswith("lora_A"):
                keep[live] = True
            else:
                keep[:, live] = True
            frozen[n] = ~keep
        for rows in client_batches(indices[k], seed=4, client=int(c), round_index=3, cfg=cfg):
            opt.zero_grad()
            loss = F.cross_entropy(model(x[rows]), y[rows])
            for m in modules:  # γ_c ||B_rootᵀ B_cluster||² with the root tier held fixed
                B = params[f"{m}.lora_B"]
                loss = loss + 0.5 * (B[:, :R].detach().T @ B[:, live]).square().sum()
            loss.backward()
            for n, p in lora.items():
                p.grad[frozen[n]] = 0.0
            torch.nn.utils.clip_grad_norm_(list(lora.values()), cfg.max_grad_norm)
            before = {n: p.detach().clone() for n, p in lora.items()}
            opt.step()
            with torch.no_grad():
                for n, p in lora.items():
                    p[frozen[n]] = before[n][frozen[n]]
        for key in trainable:
            if key.startswith("head."):
                torch.testing.assert_close(adapters[key][k], start[key][k], rtol=0, atol=0)
                continue
            torch.testing.assert_close(adapters[key][k], params[key].detach(), rtol=2e-4, atol=2e-5,
                                       msg=f"client {c} {key}")
            dim = 0 if key.endswith("lora_A") else 1
            still = torch.cat([adapters[key][k].narrow(dim, 0, R), adapters[key][k].narrow(dim, 2 * R, R)], dim)
            was = torch.cat([start[key][k].narrow(dim, 0, R), start[key][k].narrow(dim, 2 * R, R)], dim)
            torch.testing.assert_close(still, was, rtol=0, atol=0)  # root and leaf tiers: not one bit moved
            assert (adapters[key][k].narrow(dim, R, R) != start[key][k].narrow(dim, R, R)).any()


# --- LoRA dropout and the per-client loss --------------------------------------------------------
class _KeyedDropout(torch.nn.Module):
    """peft's dropout slot, applying fedhpc's documented per-client mask (key, layer salt)."""

    def __init__(self, p, salt):
        super().__init__()
        self.p, self.salt, self.key = p, salt, None

    def forward(self, h):
        return keyed_dropout(h.reshape(1, -1, h.shape[-1]), self.p, self.key, salt=self.salt).reshape(h.shape)


def test_lora_dropout_training_and_the_returned_loss_match_each_client_alone():
    p = 0.3
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["qkv", "fc1"])
    cohort = build_cohort_model(MODEL, lora, num_classes=5, seed=0)
    x, y, g = _data(2)
    indices = [np.arange(0, 21), np.arange(21, 30), np.arange(30, 60)]  # 3, 2 and 4 steps of 8
    ids = np.array([1, 6, 3])
    opt_cfg = OptimConfig(name="adamw", lr=1e-2)
    cfg = TrainConfig(local_epochs=1, batch_size=8, optimizer=opt_cfg)
    adapters = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in cohort.init_adapters(3, g).items()}
    start = {k: v.clone() for k, v in adapters.items()}
    losses = local_train(cohort, adapters=adapters, opt_state=StackedOptimizer(opt_cfg).init_state(adapters),
                         trainable=list(adapters), x=x, y=y, client_ids=ids, client_indices=indices, seed=5,
                         round_index=2, cfg=cfg, hooks=LocalHooks(), dropout=True)
    assert losses.shape == (3,) and losses.dtype == torch.float64
    for k, c in enumerate(ids):
        model, params = _peft_client({n: v[k] for n, v in start.items()}, 4, 8, dropout=p)
        slots = []
        for index, name in enumerate(cohort.targets):
            slot = _KeyedDropout(p, index)
            model.base_model.model.get_submodule(name).lora_dropout["default"] = slot
            slots.append(slot)
        opt = torch.optim.AdamW(params.values(), lr=opt_cfg.lr, betas=opt_cfg.betas, eps=opt_cfg.eps,
                                weight_decay=opt_cfg.weight_decay)
        step_losses = []
        for step, rows in enumerate(client_batches(indices[k], seed=5, client=int(c), round_index=2, cfg=cfg)):
            for slot in slots:
                slot.key = client_keys(5, torch.tensor([int(c)]), 2, step)
            opt.zero_grad()
            loss = F.cross_entropy(model(x[rows]), y[rows])
            loss.backward()
            opt.step()
            step_losses.append(loss.item())
        assert losses[k].item() == pytest.approx(np.mean(step_losses), rel=1e-5, abs=1e-6), f"client {c} loss"
        for key, value in params.items():
            torch.testing.assert_close(adapters[key][k], value.detach(), rtol=2e-4, atol=2e-5, msg=f"client {c} {key}")
    # the masks really drop something: without dropout the same clients end elsewhere
    plain = {k: v.clone() for k, v in start.items()}
    local_train(cohort, adapters=plain, opt_state=StackedOptimizer(opt_cfg).init_state(plain), trainable=list(plain),
                x=x, y=y, client_ids=ids, client_indices=indices, seed=5, round_index=2, cfg=cfg, hooks=LocalHooks())
    assert not torch.allclose(plain["blocks.0.attn.qkv.lora_A"], adapters["blocks.0.attn.qkv.lora_A"])


# --- a kept optimizer state ------------------------------------------------------------------------
def test_two_rounds_with_a_kept_optimizer_state_equal_one_continuing_torch_adamw():
    cohort = build_cohort_model(MODEL, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"]),
                                num_classes=5, seed=0)
    x, y, g = _data(3, 48)
    indices = [np.arange(0, 14), np.arange(14, 30), np.arange(30, 48)]
    ids = np.array([0, 4, 8])
    opt_cfg = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.05)
    cfg = TrainConfig(local_epochs=1, batch_size=8, optimizer=opt_cfg)
    adapters = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in cohort.init_adapters(3, g).items()}
    start = {k: v.clone() for k, v in adapters.items()}
    state = StackedOptimizer(opt_cfg).init_state(adapters)
    for round_index in (1, 2):  # the round loop hands the same state back (strategy.keep_optimizer_state)
        local_train(cohort, adapters=adapters, opt_state=state, trainable=list(adapters), x=x, y=y, client_ids=ids,
                    client_indices=indices, seed=0, round_index=round_index, cfg=cfg, hooks=LocalHooks())
    for k, c in enumerate(ids):
        model, params = _peft_client({n: v[k] for n, v in start.items()}, 4, 8)
        opt = torch.optim.AdamW(params.values(), lr=opt_cfg.lr, betas=opt_cfg.betas, eps=opt_cfg.eps,
                                weight_decay=opt_cfg.weight_decay)
        batches = [b for r in (1, 2) for b in client_batches(indices[k], seed=0, client=int(c), round_index=r, cfg=cfg)]
        for rows in batches:
            opt.zero_grad()
            F.cross_entropy(model(x[rows]), y[rows]).backward()
            opt.step()
        assert int(state["step"][k]) == len(batches)
        for key, value in params.items():
            torch.testing.assert_close(adapters[key][k], value.detach(), rtol=2e-4, atol=2e-5, msg=f"client {c} {key}")
            torch.testing.assert_close(state[f"{key}.exp_avg_sq"][k], opt.state[value]["exp_avg_sq"], rtol=1e-3,
                                       atol=1e-9)


# --- batch plans and pass splitting, brute force ----------------------------------------------------
@pytest.mark.parametrize("n, batch, epochs", [(21, 8, 3), (16, 4, 2), (5, 8, 2)])
def test_client_batches_take_each_index_once_per_epoch_in_a_new_order(n, batch, epochs):
    indices = np.arange(100, 100 + n) * 3  # not 0..n-1: the batches must hold the client's own indices
    plan = client_batches(indices, seed=1, client=7, round_index=2, cfg=TrainConfig(local_epochs=epochs, batch_size=batch))
    per_epoch = -(-n // batch)
    assert len(plan) == epochs * per_epoch
    sizes = [batch] * (n // batch) + ([n % batch] if n % batch else [])
    orders = []
    for e in range(epochs):
        part = plan[e * per_epoch:(e + 1) * per_epoch]
        assert [len(b) for b in part] == sizes
        flat = np.concatenate(part)
        assert sorted(flat.tolist()) == sorted(indices.tolist())  # every index exactly once in the epoch
        orders.append(flat)
    if n > 2:
        assert not all(np.array_equal(orders[0], o) for o in orders[1:]) or epochs == 1
        again = client_batches(indices, seed=1, client=7, round_index=3, cfg=TrainConfig(local_epochs=epochs, batch_size=batch))
        assert not np.array_equal(np.concatenate(again), np.concatenate(plan))  # a new order each round


@pytest.mark.parametrize("n, batch, steps", [(10, 4, 7), (3, 4, 5), (12, 4, 3)])
def test_local_steps_wrap_around_epochs(n, batch, steps):
    indices = np.arange(n) + 50
    plan = client_batches(indices, seed=2, client=1, round_index=1, cfg=TrainConfig(local_steps=steps, batch_size=batch))
    assert len(plan) == steps and all(len(b) == batch for b in plan)
    flat = np.concatenate(plan)
    for start in range(0, len(flat), n):  # each run of n consecutive rows is one epoch: every index once
        chunk = flat[start:start + n]
        assert len(set(chunk.tolist())) == len(chunk) and set(chunk.tolist()) <= set(indices.tolist())
    assert set(flat.tolist()) == set(indices.tolist()) or len(flat) < n


@pytest.mark.parametrize("count, per_pass, sizes", [
    (7, 3, [3, 4]), (6, 3, [3, 3]), (5, 2, [2, 3]), (1, 4, [1]), (2, 4, [2]), (9, 4, [4, 5]), (8, 8, [8]),
    (10, 3, [3, 3, 4])])
def test_split_passes_never_leaves_a_client_alone(count, per_pass, sizes):
    clients = np.arange(count) * 2 + 1
    chunks = split_passes(clients, per_pass)
    assert [len(c) for c in chunks] == sizes
    assert np.array_equal(np.concatenate(chunks), clients)


def test_any_clients_per_pass_of_two_or_more_gives_the_same_numbers(tmp_path):
    """The config's claim, end to end: 2, 3 and 6 clients per pass (6 seen clients: one pass) give the
    same summary, metrics and client accuracies, bit for bit."""
    from fedhpc.config import load_config
    from fedhpc.experiment import run

    got = {}
    for per_pass in (2, 3, 6):
        cfg = load_config(REPO / "configs/quickstart.yaml",
                          TINY + [f"out_dir={tmp_path / str(per_pass)}", f"train.clients_per_pass={per_pass}",
                                  "strategy.name=fedsa_lora", "lora.lora_dropout=0.1", "checkpoint.every=0"])
        summary = run(cfg, comm=MPI.COMM_SELF, progress=False)
        folder = tmp_path / str(per_pass) / "quickstart"
        lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        drop = {"wall_seconds", "round_seconds", "clients_per_second", "clients_per_pass"}
        got[per_pass] = ({k: v for k, v in summary.items() if k not in drop},
                         [{k: v for k, v in m.items() if k not in drop} for m in lines],
                         json.loads((folder / "client_accuracy.json").read_text()))
    assert got[2] == got[3] == got[6]


class _Correction(LocalHooks):
    """A SCAFFOLD-like hook: adds a fixed per-client correction to every gradient, counts steps taken."""

    def __init__(self, shift):
        self.shift, self.taken = shift, 0

    def grads(self, grads, adapters):
        for key, g in grads.items():
            g.add_(self.shift[key])

    def stepped(self, active):
        self.taken += int(active.sum())


def test_a_hooks_gradient_transform_reaches_the_step_before_clipping():
    cohort = build_cohort_model(MODEL, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"]),
                                num_classes=5, seed=0)
    x, y, g = _data(4, 40)
    indices = [np.arange(0, 16), np.arange(16, 40)]
    ids = np.array([3, 9])
    opt_cfg = OptimConfig(name="sgd", lr=5e-2, momentum=0.5)
    cfg = TrainConfig(local_epochs=1, batch_size=8, optimizer=opt_cfg, max_grad_norm=1.0)
    adapters = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in cohort.init_adapters(2, g).items()}
    start = {k: v.clone() for k, v in adapters.items()}
    shift = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in adapters.items()}
    hooks = _Correction(shift)
    local_train(cohort, adapters=adapters, opt_state=StackedOptimizer(opt_cfg).init_state(adapters),
                trainable=list(adapters), x=x, y=y, client_ids=ids, client_indices=indices, seed=1, round_index=1,
                cfg=cfg, hooks=hooks)
    assert hooks.taken == 2 + 3  # the clients' steps, each counted once
    for k, c in enumerate(ids):
        model, params = _peft_client({n: v[k] for n, v in start.items()}, 4, 8)
        opt = torch.optim.SGD(params.values(), lr=opt_cfg.lr, momentum=opt_cfg.momentum)
        for rows in client_batches(indices[k], seed=1, client=int(c), round_index=1, cfg=cfg):
            opt.zero_grad()
            F.cross_entropy(model(x[rows]), y[rows]).backward()
            for n, p in params.items():
                p.grad += shift[n][k]
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            opt.step()
        for key, value in params.items():
            torch.testing.assert_close(adapters[key][k], value.detach(), rtol=2e-4, atol=2e-5, msg=f"client {c} {key}")

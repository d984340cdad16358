"""Cohort training equals training each client alone with peft + torch.optim (the reference)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from fedhpc.models.backbone import build_backbone, build_cohort_model
from fedhpc.models.config import LoraConfig, ModelConfig
from fedhpc.train.local import LocalHooks, TrainConfig, client_batches, local_train
from fedhpc.train.optim import OptimConfig, StackedOptimizer, clip_per_client

MODEL = ModelConfig(name="vit_tiny_patch16_224", kwargs=dict(img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2))
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"])


def _peft_client(adapters_k, rank, alpha, *, dropout=0.0):
    """One client alone: a peft model holding `adapters_k`, and its trainable parameters by fedhpc key."""
    backbone, head, _ = build_backbone(MODEL, num_classes=5, seed=0)
    model = get_peft_model(backbone, PeftLoraConfig(r=rank, lora_alpha=alpha, target_modules=["qkv", "fc1"],
                                                    lora_dropout=dropout, modules_to_save=[head])).eval()
    params = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = name.replace("base_model.model.", "").replace(".default", "").replace(".modules_to_save", "")
        key = key.removesuffix(".weight") if ".lora_" in key else key
        with torch.no_grad():
            p.copy_(adapters_k[key])
        params[key] = p
    return model, params


def _reference_client(adapters_k, x, y, batches, opt_cfg, max_norm):
    """One client trained alone: a peft model and torch's own optimizer."""
    model, params = _peft_client(adapters_k, 4, 8)
    if opt_cfg.name == "adamw":
        opt = torch.optim.AdamW(params.values(), lr=opt_cfg.lr, betas=opt_cfg.betas, eps=opt_cfg.eps,
                                weight_decay=opt_cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params.values(), lr=opt_cfg.lr, momentum=opt_cfg.momentum,
                              weight_decay=opt_cfg.weight_decay)
    for rows in batches:
        opt.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        if max_norm:
            torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm)
        opt.step()
    return {k: p.detach() for k, p in params.items()}


@pytest.mark.parametrize("opt_cfg, max_norm", [
    (OptimConfig(name="adamw", lr=1e-2, weight_decay=0.01), 0.0),
    (OptimConfig(name="sgd", lr=5e-2, momentum=0.9), 0.5),
], ids=["adamw", "sgd-momentum-clip"])
def test_cohort_training_matches_each_client_trained_alone(opt_cfg, max_norm):
    cohort = build_cohort_model(MODEL, LORA, num_classes=5, seed=0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 3, 16, 16, generator=g), torch.randint(0, 5, (60,), generator=g)
    # unequal data: clients run out of batches at different steps (the `active` mask)
    indices = [np.arange(0, 20), np.arange(20, 27), np.arange(27, 60)]
    ids = np.array([4, 9, 11])
    cfg = TrainConfig(local_epochs=2, batch_size=8, optimizer=opt_cfg, max_grad_norm=max_norm)
    adapters = cohort.init_adapters(3, g)
    start = {k: v.clone() for k, v in adapters.items()}
    trainable = list(adapters)
    state = StackedOptimizer(opt_cfg).init_state(adapters)
    local_train(cohort, adapters=adapters, opt_state=state, trainable=trainable, x=x, y=y, client_ids=ids,
                client_indices=indices, seed=3, round_index=2, cfg=cfg, hooks=LocalHooks())
    for k, c in enumerate(ids):
        batches = client_batches(indices[k], seed=3, client=int(c), round_index=2, cfg=cfg)
        ref = _reference_client({n: v[k] for n, v in start.items()}, x, y, batches, opt_cfg, max_norm)
        for key in trainable:
            torch.testing.assert_close(adapters[key][k], ref[key], rtol=2e-4, atol=2e-5, msg=f"client {c} {key}")


def test_clip_per_client_matches_torch():
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(4, 3, 5, generator=g), torch.randn(4, 7, generator=g)]
    for t in grads:  # client 2's gradient is below the bound: clipping must leave it as it is
        t[2] *= 0.05
    small = [t[2].clone() for t in grads]
    ref = []
    for c in range(4):
        params = [torch.nn.Parameter(torch.zeros_like(t[c])) for t in grads]
        for p, t in zip(params, grads):
            p.grad = t[c].clone()
        ref.append(params)
    clip_per_client(grads, 1.5)
    assert all(torch.equal(t[2], before) for t, before in zip(grads, small))
    for c in range(4):
        torch.nn.utils.clip_grad_norm_(ref[c], 1.5)
        for mine, theirs in zip(grads, ref[c]):
            torch.testing.assert_close(mine[c], theirs.grad)


def test_local_steps_cycle_through_data_with_a_keyed_order():
    cfg = TrainConfig(local_steps=5, batch_size=4)
    a = client_batches(np.arange(10), seed=0, client=3, round_index=1, cfg=cfg)
    b = client_batches(np.arange(10), seed=0, client=3, round_index=1, cfg=cfg)
    c = client_batches(np.arange(10), seed=0, client=4, round_index=1, cfg=cfg)
    assert len(a) == 5 and all(len(x) == 4 for x in a)
    assert all((p == q).all() for p, q in zip(a, b))
    assert any((p != q).any() for p, q in zip(a, c))


@pytest.mark.parametrize("opt_cfg", [OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1),
                                     OptimConfig(name="sgd", lr=5e-2, momentum=0.9, weight_decay=0.1)],
                         ids=["adamw", "sgd-momentum"])
def test_lr_scale_steps_like_torch_at_the_scaled_rate(opt_cfg):
    g = torch.Generator().manual_seed(5)
    p0, grads = torch.randn(3, 4, 5, generator=g), [torch.randn(3, 4, 5, generator=g) for _ in range(3)]
    opt = StackedOptimizer(opt_cfg)
    params = {"w": p0.clone()}
    state = opt.init_state(params)
    ref = p0.clone().requires_grad_(True)
    lr = opt_cfg.lr * 0.1
    torch_opt = (torch.optim.AdamW([ref], lr=lr, betas=opt_cfg.betas, eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay)
                 if opt_cfg.name == "adamw" else
                 torch.optim.SGD([ref], lr=lr, momentum=opt_cfg.momentum, weight_decay=opt_cfg.weight_decay))
    for grad in grads:
        opt.step(params, {"w": grad.clone()}, state, lr_scale=0.1)
        ref.grad = grad.clone()
        torch_opt.step()
    torch.testing.assert_close(params["w"], ref.detach())

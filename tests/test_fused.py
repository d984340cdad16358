"""The opt-in fast paths of local training (train.precision=bf16, train.compile) and the
multi-tensor optimizer step, each against an independent reference:

- the multi-tensor AdamW / SGD step equals a per-key loop of plain torch ops (the previous
  implementation, kept here as the reference) bit for bit, partial activity and masks included;
- bf16: the gradients of one cohort step against float64 autograd on the same model (tolerance
  stated below), every frozen matmul dispatched in bf16 and every adapter product in float32 (a
  TorchDispatchMode records the dtypes), adapters and optimizer state float32 after training;
- compile: a compiled round equals the eager round within float32 rounding, and a second round
  compiles nothing (TorchDynamo's graph counter);
- bad values of train.precision / train.compile: one-line errors naming the key.
"""
import contextlib
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import REPO, TINY
from fedhpc.config import ConfigError, load_config
from fedhpc.models.backbone import build_cohort_model
from fedhpc.models.config import LoraConfig, ModelConfig
from fedhpc.train.fused import compile_count, precision_context
from fedhpc.train.local import LocalHooks, TrainConfig, local_train
from fedhpc.train.optim import OptimConfig, StackedOptimizer

MODEL = ModelConfig(name="vit_tiny_patch16_224", kwargs=dict(img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2))
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"], lora_dropout=0.1)


def _loop_step(cfg, params, grads, state, active, lr_scale=1.0, movable=None):
    """The per-key loop the multi-tensor step replaced: the reference, op for op."""
    lr = cfg.lr * lr_scale
    count = state["step"].shape[0]
    state["step"] += active.to(torch.int64)
    everyone = bool(active.all())
    t = state["step"].clamp(min=1).to(torch.float64)
    bc1, bc2_sqrt = 1 - cfg.betas[0] ** t, (1 - cfg.betas[1] ** t).sqrt()
    step_size = (lr / bc1).to(torch.float32)

    def assign(dst, src, mask):
        dst.copy_(src if mask is None else torch.where(mask, src, dst))

    for key, grad in grads.items():
        p = params[key]
        shape = (count,) + (1,) * (p.dim() - 1)
        mask = None if everyone else active.view(shape)
        if cfg.name == "adamw":
            m, v = state[f"{key}.exp_avg"], state[f"{key}.exp_avg_sq"]
            new_m = torch.lerp(m, grad, 1 - cfg.betas[0])
            new_v = v * cfg.betas[1] + grad * grad * (1 - cfg.betas[1])
            update = new_m / (new_v.sqrt() / bc2_sqrt.to(v.dtype).view(shape) + cfg.eps) * step_size.view(shape)
            if cfg.weight_decay:
                update = update + p * (lr * cfg.weight_decay)
            assign(m, new_m, mask)
            assign(v, new_v, mask)
        else:
            update = grad + p * cfg.weight_decay if cfg.weight_decay else grad
            if cfg.momentum > 0:
                buf = state[f"{key}.momentum"]
                new_buf = buf * cfg.momentum + update
                assign(buf, new_buf, mask)
                update = new_buf
            update = update * lr
        if movable and key in movable:
            update = update * movable[key]
        assign(p, p - update, mask)


@pytest.mark.parametrize("cfg", [OptimConfig(name="adamw", lr=1e-2, weight_decay=0.01),
                                 OptimConfig(name="adamw", lr=3e-3),
                                 OptimConfig(name="sgd", lr=5e-2, momentum=0.9, weight_decay=0.1),
                                 OptimConfig(name="sgd", lr=5e-2)], ids=["adamw-wd", "adamw", "sgd-mom-wd", "sgd"])
def test_multi_tensor_step_equals_the_per_key_loop_bit_for_bit(cfg):
    g = torch.Generator().manual_seed(0)
    params = {"a.lora_A": torch.randn(5, 4, 7, generator=g), "a.lora_B": torch.randn(5, 6, 4, generator=g),
              "head.bias": torch.randn(5, 3, generator=g)}
    opt = StackedOptimizer(cfg)
    mine, ref = copy.deepcopy(params), copy.deepcopy(params)
    state_mine, state_ref = opt.init_state(mine), opt.init_state(ref)
    movable = {"a.lora_B": torch.rand(1, 6, 4, generator=g) > 0.3}
    for step in range(4):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
        active = torch.tensor([True, step < 2, True, step != 1, True])
        opt.step(mine, {k: v.clone() for k, v in grads.items()}, state_mine, active, lr_scale=0.7, movable=movable)
        _loop_step(cfg, ref, grads, state_ref, active, lr_scale=0.7, movable=movable)
    for k in params:
        assert torch.equal(mine[k], ref[k]), k
    for k in state_ref:
        assert torch.equal(state_mine[k], state_ref[k]), k


def _setup(count=3, seed=0):
    cohort = build_cohort_model(MODEL, LORA, num_classes=5, seed=0)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(20 * count, 3, 16, 16, generator=g), torch.randint(0, 5, (20 * count,), generator=g)
    adapters = cohort.init_adapters(count, g)
    # nonzero B: the adapters' products carry gradient to A too
    adapters = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in adapters.items()}
    return cohort, x, y, adapters


def _grads(model, x, y, adapters, count, *, bf16=False, mode=None):
    """Gradients of the summed per-client mean losses; autocast around the forward only, as in
    local_train (a backward under autocast would recast the backward's own matmuls)."""
    live = {k: v.detach().clone().requires_grad_(True) for k, v in adapters.items()}
    mode = mode or contextlib.nullcontext()
    with mode:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x, live)
        loss = F.cross_entropy(logits.float(), y, reduction="none").view(count, -1).mean(1).sum()
        return dict(zip(live, torch.autograd.grad(loss, list(live.values()))))


class _Dtypes(TorchDispatchMode):
    """The input dtypes of every matmul dispatched, forward and backward: (op name, dtype of its
    first matrix argument). The backward of a frozen bf16 matmul is bf16 too; an adapter product
    and its backward are float32."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu"):
            self.seen.append((name, args[1].dtype if name in ("addmm", "baddbmm") else args[0].dtype))
        return func(*args, **(kwargs or {}))


def test_bf16_gradients_against_float64_and_fp32_stays_exact():
    """Relative gradient error of one cohort step against float64: bf16 within 5e-2 (bf16 keeps 8
    significant bits, ~4e-3 per rounding, accumulated over depth 2), fp32 within 1e-5."""
    count = 3
    cohort, x, y, adapters = _setup(count)
    x, y = x[:8 * count], y[:8 * count]
    ref = _grads(copy.deepcopy(cohort).double(), x.double(), y, {k: v.double() for k, v in adapters.items()}, count)
    fp32 = _grads(cohort, x, y, adapters, count)
    seen = _Dtypes()
    bf16 = _grads(cohort, x, y, adapters, count, bf16=True, mode=seen)

    def rel(got):
        num = sum((got[k].double() - ref[k]).norm() ** 2 for k in ref) ** 0.5
        return float(num / sum(ref[k].norm() ** 2 for k in ref) ** 0.5)

    assert all(g.dtype == torch.float32 for g in bf16.values())
    assert rel(fp32) < 1e-5
    assert 1e-4 < rel(bf16) < 5e-2, rel(bf16)  # lower bound: bf16 really ran
    frozen = [d for op, d in seen.seen if op in ("mm", "addmm", "_scaled_dot_product_flash_attention_for_cpu")]
    adapter = [d for op, d in seen.seen if op in ("bmm", "baddbmm")]
    assert frozen and set(frozen) == {torch.bfloat16}, set(frozen)
    assert adapter and set(adapter) == {torch.float32}, set(adapter)


def _train(cohort, x, y, adapters, *, rounds=1, **train):
    count = len(next(iter(adapters.values())))
    cfg = TrainConfig(local_epochs=1, batch_size=8, optimizer=OptimConfig(lr=1e-2, weight_decay=0.01), **train)
    out, state = {k: v.clone() for k, v in adapters.items()}, None
    indices = [np.arange(20 * c, 20 * c + 20 - 3 * c) for c in range(count)]  # unequal: some clients idle
    for round_index in range(1, rounds + 1):
        state = StackedOptimizer(cfg.optimizer).init_state(out)
        local_train(cohort, adapters=out, opt_state=state, trainable=list(out), x=x, y=y,
                    client_ids=np.arange(count), client_indices=indices, seed=1, round_index=round_index,
                    cfg=cfg, hooks=LocalHooks(), dropout=True)
    return out, state


def test_bf16_training_keeps_adapters_and_optimizer_float32_and_lands_near_fp32():
    """A bf16 round against the fp32 round (itself tested against peft in test_local_train): the
    total update differs by < 15 % in norm (AdamW's early steps are ~lr·sign(g), so entries
    whose gradient is near 0 flip), and by more than nothing."""
    cohort, x, y, adapters = _setup()
    fp32, _ = _train(cohort, x, y, adapters)
    bf16, state = _train(cohort, x, y, adapters, precision="bf16")
    assert all(v.dtype == torch.float32 for v in bf16.values())
    assert all(v.dtype == torch.float32 for k, v in state.items() if k != "step")
    diff = sum((bf16[k] - fp32[k]).norm() ** 2 for k in fp32) ** 0.5
    moved = sum((fp32[k] - adapters[k]).norm() ** 2 for k in fp32) ** 0.5
    assert 0 < diff < 0.15 * moved, (float(diff), float(moved))


@pytest.mark.slow  # compiles a depth-2 ViT forward + backward: minutes on a loaded 2-core CPU
def test_compiled_training_matches_eager_and_round_two_compiles_nothing():
    cohort, x, y, adapters = _setup()
    eager, _ = _train(cohort, x, y, adapters, rounds=2)
    before = compile_count()
    compiled, _ = _train(cohort, x, y, adapters, rounds=1, compile=True)
    after_one = compile_count()
    assert after_one > before  # it compiled
    compiled, _ = _train(cohort, x, y, adapters, rounds=2, compile=True)
    assert compile_count() == after_one, "round 2 (same pass shapes) recompiled"
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("override, key", [("train.precision=fp16", "train.precision"),
                                           ("train.compile=maybe", "train.compile")])
def test_bad_precision_or_compile_is_one_line_naming_the_key(override, key):
    with pytest.raises((ConfigError, ValueError)) as err:
        load_config(REPO / "configs/quickstart.yaml", TINY + [override])
    assert key in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="train.precision"):
        TrainConfig(precision="fp16")


def test_bf16_attention_runs_at_a_vit_length_under_the_pinned_cpu_kernels():
    """65 tokens (a 32x32 image in 4x4 patches, plus the class token): on a CPU with AVX512-BF16 torch's
    fused bf16 attention raised under fedhpc's AVX2 kernels; precision_context falls back to plain
    matmuls there. Against float64 to bf16's precision."""
    q, k, v = torch.randn(3, 2, 4, 65, 16, generator=torch.Generator().manual_seed(0))
    with precision_context("bf16", torch.device("cpu")):
        out = F.scaled_dot_product_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), want, rtol=0, atol=3e-2)

"""Heterogeneous LoRA ranks: config forms, padded cohorts equal peft at each rank, padding stays
zero through training, bytes at true rank, and every product-space method is rank-count invariant."""
import json

import numpy as np
import pytest
import torch
from mpi4py import MPI
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from fedhpc.config import ConfigError, load_config
from fedhpc.experiment import run
from fedhpc.models.backbone import build_backbone, build_cohort_model
from fedhpc.models.config import LoraConfig, ModelConfig
from fedhpc.models.ranks import mask_to_ranks
from fedhpc.train.local import LocalHooks, TrainConfig, local_train
from fedhpc.train.optim import OptimConfig, StackedOptimizer

from conftest import REPO, TINY, mpiexec
from test_experiment import _close

VIT = ModelConfig(name="vit_tiny_patch16_224", kwargs=dict(img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2))


def test_rank_forms_and_their_errors():
    assert LoraConfig(ranks=[2, 4, 8]).client_ranks(7, seed=0).tolist() == [2, 4, 8, 2, 4, 8, 2]
    tiers = LoraConfig(tiers={"small": 2, "large": 8}, client_tiers=["small", "small", "large"])
    assert tiers.client_ranks(4, seed=0).tolist() == [2, 2, 8, 2]
    drawn = LoraConfig(rank_choices=[2, 8], rank_probs=[0.25, 0.75])
    a, b = drawn.client_ranks(400, seed=1), drawn.client_ranks(400, seed=1)
    assert (a == b).all() and set(a.tolist()) == {2, 8} and 0.65 < (a == 8).mean() < 0.85
    assert (LoraConfig(r=6).client_ranks(3, seed=0) == 6).all()
    for bad, match in [({"ranks": [2], "rank_choices": [4]}, "one form"),
                       ({"tiers": {"s": 2}, "client_tiers": ["m"]}, "does not define"),
                       ({"tiers": {"s": 2}}, "go together"),
                       ({"rank_choices": [2, 4], "rank_probs": [1.0]}, "rank_probs"),
                       ({"ranks": [0, 2]}, ">= 1")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, [f"lora.{k}={json.dumps(v)}" for k, v in bad.items()])
    with pytest.raises(ValueError, match="lora.ranks has 3 entries for only 2 clients"):
        LoraConfig(ranks=[2, 4, 8]).client_ranks(2, seed=0)


def test_padded_cohort_equals_peft_at_each_clients_rank():
    ranks = torch.tensor([1, 3, 4])
    cohort = build_cohort_model(VIT, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"]), num_classes=5, seed=0)
    g = torch.Generator().manual_seed(0)
    adapters = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in cohort.init_adapters(3, g).items()}
    adapters = mask_to_ranks(adapters, ranks)
    x = torch.randn(3 * 2, 3, 16, 16, generator=g)
    with torch.no_grad():
        ours = cohort(x, adapters, scaling=8.0 / ranks.double()).view(3, 2, -1)
    for k, r in enumerate(ranks.tolist()):
        backbone, head, call = build_backbone(VIT, num_classes=5, seed=0)
        peft_model = get_peft_model(backbone, PeftLoraConfig(r=r, lora_alpha=8, target_modules=["qkv"],
                                                             modules_to_save=[head])).eval()
        state = {f"base_model.model.{head}.modules_to_save.default.{p}": adapters[f"head.{p}"][k] for p in ("weight", "bias")}
        for name in cohort.targets:
            state[f"base_model.model.{name}.lora_A.default.weight"] = adapters[f"{name}.lora_A"][k, :r]
            state[f"base_model.model.{name}.lora_B.default.weight"] = adapters[f"{name}.lora_B"][k, :, :r]
        assert not peft_model.load_state_dict(state, strict=False).unexpected_keys
        with torch.no_grad():
            torch.testing.assert_close(ours[k], call(peft_model.base_model.model, x[2 * k:2 * k + 2]), rtol=1e-5, atol=1e-5)


def test_base_delta_acts_as_a_replaced_frozen_weight():
    cohort = build_cohort_model(VIT, LoraConfig(target_modules=["qkv"]), num_classes=5, seed=0)
    g = torch.Generator().manual_seed(1)
    adapters = cohort.init_adapters(2, g)
    name = cohort.targets[0]
    delta = 0.1 * torch.randn(1, *cohort.frozen_weights()[name].shape, generator=g)
    x = torch.randn(4, 3, 16, 16, generator=g)
    with torch.no_grad():
        ours = cohort(x, {**adapters, f"{name}.base_delta": delta})
        cohort.frozen_weights()[name].add_(delta[0])  # the same update, merged into W0
        merged = cohort(x, adapters)
    torch.testing.assert_close(ours, merged, rtol=1e-5, atol=1e-5)


class _Push(LocalHooks):
    """Adds a gradient everywhere, padded entries included (as a control variate could)."""

    def grads(self, grads, adapters):
        for g in grads.values():
            g.add_(0.3)


def test_padded_rows_stay_exactly_zero_through_training():
    cohort = build_cohort_model(VIT, LoraConfig(r=4, target_modules=["qkv", "fc1"]), num_classes=5, seed=0)
    ranks = torch.tensor([2, 4, 1])
    g = torch.Generator().manual_seed(2)
    adapters = mask_to_ranks({k: v + 0.05 * torch.randn(v.shape, generator=g)
                              for k, v in cohort.init_adapters(3, g).items()}, ranks)
    before = {k: v.clone() for k, v in adapters.items()}
    cfg = TrainConfig(local_steps=3, batch_size=4, optimizer=OptimConfig(lr=0.01, weight_decay=0.1))
    x, y = torch.randn(30, 3, 16, 16, generator=g), torch.randint(0, 5, (30,), generator=g)
    opt = StackedOptimizer(cfg.optimizer).init_state(adapters)
    local_train(cohort, adapters=adapters, opt_state=opt, trainable=list(adapters), x=x, y=y,
                client_ids=np.arange(3), client_indices=[np.arange(10 * c, 10 * c + 10) for c in range(3)], seed=0,
                round_index=1, cfg=cfg, hooks=_Push(), scaling=4.0 / ranks.double(), ranks=ranks)
    for key, value in adapters.items():
        for c, r in enumerate(ranks.tolist()):  # padding stays exactly 0: rows r.. of A, columns r.. of B
            pad = value[c, r:] if key.endswith("lora_A") else value[c, :, r:] if key.endswith("lora_B") else None
            assert pad is None or (pad.numel() == 0 and r == 4) or bool((pad == 0).all()), (key, c)
        assert (value - before[key]).abs().amax(dim=tuple(range(1, value.dim()))).min() > 0  # every client trained


def test_bytes_are_counted_at_each_clients_true_rank(tmp_path):
    cfg = load_config(REPO / "configs/quickstart.yaml",
                      TINY + [f"out_dir={tmp_path}", "lora.ranks=[2, 4, 8]", "data.unseen_fraction=0.0",
                              "eval.unseen_finetune_epochs=0", "rounds=1"])
    summary = run(cfg, comm=MPI.COMM_SELF, progress=False)
    ranks = np.resize([2, 4, 8], 8)
    d = 32  # two blocks of qkv (d -> 3d) and fc1 (d -> 4d); head 10 x d + 10
    per_round = sum(2 * r * ((d + 3 * d) + (d + 4 * d)) + 10 * d + 10 for r in ranks) * 4
    assert summary["bytes_up"] == summary["bytes_down"] == per_round


HETERO = ["lora.ranks=[2, 4, 8]", "sampling.fraction=0.7", "train.clients_per_pass=2"]
METHODS = [["strategy.name=ilora", "strategy.use_control=true"], ["strategy.name=flexlora"],
           ["strategy.name=hetlora"], ["strategy.name=fedex_lora"], ["strategy.name=lora_fair"], ["strategy.name=flora"]]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m[0].split("=")[1])
def test_two_ranks_give_the_one_rank_summary(method, tmp_path):
    args = TINY + HETERO + method
    run(load_config(REPO / "configs/quickstart.yaml", args + [f"out_dir={tmp_path / 'n1'}"]), comm=MPI.COMM_SELF,
        progress=False)
    one = json.loads((tmp_path / "n1" / "quickstart" / "summary.json").read_text())
    proc = mpiexec(2, ["run", str(REPO / "configs/quickstart.yaml"), *args, f"out_dir={tmp_path / 'n2'}", "--quiet"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "n2" / "quickstart" / "summary.json").read_text())
    assert two["ranks"] == 2
    _close(one, two)

"""Fisher scores per client and layer against a per-client, per-sample loop through a peft-free
dense reference: the same model run for one client and one sample at a time."""
import numpy as np
import pytest
import torch

from fedhpc.models.backbone import build_cohort_model
from fedhpc.models.config import LoraConfig, ModelConfig
from fedhpc.train.scoring import fisher_scores


@pytest.mark.parametrize("target", ["logit", "log_prob"])
def test_fisher_scores_match_one_client_one_sample_at_a_time(target):
    torch.manual_seed(0)
    model = build_cohort_model(ModelConfig(name="vit_tiny_patch16_224", kwargs=dict(
        img_size=16, patch_size=8, depth=1, embed_dim=16, num_heads=2)),
        LoraConfig(r=2, lora_alpha=4, target_modules=["qkv", "fc1"]), num_classes=3, seed=0)
    model = model.double()
    gen = torch.Generator().manual_seed(1)
    adapters = {k: torch.randn(3, *s, generator=gen, dtype=torch.float64) * 0.3 for k, s in model.shapes.items()}
    x = torch.randn(10, 3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=gen)
    indices = [np.array([0, 4, 7]), np.array([1]), np.array([2, 3])]  # uneven: clients sit positions out
    keys = [k for k in model.shapes if k.endswith("lora_A") or k.endswith("lora_B")]
    scores = fisher_scores(model, adapters, x=x, y=y, indices=indices, keys=keys, target=target)
    for c, ix in enumerate(indices):
        own = {k: v[c:c + 1].clone().requires_grad_(k in keys) for k, v in adapters.items()}
        expected = {k: 0.0 for k in keys}
        for i in ix:
            out = model(x[i:i + 1], own)
            if target == "log_prob":
                out = out.log_softmax(-1)
            grads = torch.autograd.grad(out[0, y[i]], [own[k] for k in keys])
            for k, g in zip(keys, grads):
                expected[k] += float(g.square().sum())
        for k in keys:
            assert scores[k][c].item() == pytest.approx(expected[k], rel=1e-9), (c, k)
    assert all(float(scores[k].min()) > 0 for k in keys if k.endswith("lora_A"))


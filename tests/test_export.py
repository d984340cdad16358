"""`fedhpc export`: peft loads the folder onto the run's backbone and predicts what fedhpc evaluated."""
import json

import numpy as np
import torch
from mpi4py import MPI
from peft import PeftModel

from conftest import REPO, TINY
from fedhpc.cli import main
from fedhpc.config import load_config
from fedhpc.assemble import assemble
from fedhpc.experiment import run
from fedhpc.io.checkpoint import find_resumable, load
from fedhpc.io.export import write_peft_adapter
from fedhpc.models.backbone import build_backbone, build_cohort_model
from fedhpc.models.config import LoraConfig, ModelConfig
from fedhpc.models.ranks import mask_to_ranks


def _peft(cfg, folder, num_classes):
    backbone, _, call = build_backbone(cfg.model, num_classes=num_classes, seed=cfg.seed)
    model = PeftModel.from_pretrained(backbone, str(folder)).eval()
    return lambda x: call(model, x)


def test_exported_client_model_matches_fedhpc(tmp_path):
    cfg = load_config(REPO / "configs/quickstart.yaml", TINY + [f"out_dir={tmp_path}", "strategy.name=fedsa_lora"])
    summary = run(cfg, comm=MPI.COMM_SELF, progress=False)
    with torch.no_grad():
        _check_exports(cfg, summary, tmp_path)


def _check_exports(cfg, summary, tmp_path):
    run_dir = tmp_path / "quickstart"
    r = assemble(cfg, MPI.COMM_SELF)
    data = r.data
    evaluated = json.loads((run_dir / "client_accuracy.json").read_text())
    client = int(data.seen[2])
    assert main(["export", str(run_dir), "--client", str(client), "--out", str(tmp_path / "k")]) == 0
    assert {p.name for p in (tmp_path / "k").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    peft_logits = _peft(cfg, tmp_path / "k", data.num_classes)
    test = data.client_test[client]
    x = data.test_x[test]
    # fedhpc's own forward of client K from the final checkpoint
    ids = np.array([client])
    saved = load(find_resumable(run_dir, comm=MPI.COMM_SELF), clients=ids, device="cpu")
    ours = r.model(x, {k: v.expand(len(x), *v.shape[1:]) for k, v in
                       r.strategy.configure_evaluate(saved.server, saved.clients, ids).items()})
    torch.testing.assert_close(peft_logits(x), ours, rtol=1e-5, atol=1e-5)
    # ... and the accuracy fedhpc reported for client K in its last evaluation
    accuracy = float((peft_logits(x).argmax(-1) == data.test_y[test]).double().mean())
    assert accuracy == evaluated["personalized_accuracy"][evaluated["clients"].index(client)]

    assert main(["export", str(run_dir), "--global", "--out", str(tmp_path / "g")]) == 2  # fedsa_lora has none


def test_heterogeneous_rank_client_with_a_folded_residual_matches_fedhpc(tmp_path):
    """FedEx-LoRA folds an exact residual into W0 and client 0 has rank 2 of [2, 4]: the export
    must carry both (rank cut, scaling alpha / r_k, residual as extra rank)."""
    cfg = load_config(REPO / "configs/quickstart.yaml", TINY + [f"out_dir={tmp_path}", "strategy.name=fedex_lora",
                                                                "lora.ranks=[2, 4]"])
    run(cfg, comm=MPI.COMM_SELF, progress=False)
    r = assemble(cfg, MPI.COMM_SELF)
    client = int(next(c for c in r.data.seen if r.ranks.ranks[c] == 2))
    assert main(["export", str(tmp_path / "quickstart"), "--client", str(client), "--out", str(tmp_path / "k")]) == 0
    x = r.data.test_x[r.data.client_test[client]]
    ids = np.array([client])
    saved = load(find_resumable(tmp_path / "quickstart", comm=MPI.COMM_SELF), clients=ids, device="cpu")
    adapters = mask_to_ranks(r.strategy.configure_evaluate(saved.server, saved.clients, ids), r.ranks.of(ids))
    assert any(k.endswith(".base_delta") and v.abs().max() > 0 for k, v in adapters.items())
    with torch.no_grad():
        per_row = {k: v if k.endswith(".base_delta") else v.expand(len(x), *v.shape[1:]) for k, v in adapters.items()}
        ours = r.model(x, per_row, scaling=r.ranks.scaling(ids).expand(len(x)))
        torch.testing.assert_close(_peft(cfg, tmp_path / "k", r.data.num_classes)(x), ours, rtol=1e-4, atol=1e-4)


def test_exported_global_model_matches_fedhpc(tmp_path):
    cfg = load_config(REPO / "configs/quickstart.yaml", TINY + [f"out_dir={tmp_path}", "rounds=1"])
    summary = run(cfg, comm=MPI.COMM_SELF, progress=False)
    assert main(["export", str(tmp_path / "quickstart"), "--global", "--out", str(tmp_path / "g")]) == 0
    data = assemble(cfg, MPI.COMM_SELF).data
    with torch.no_grad():
        logits = _peft(cfg, tmp_path / "g", data.num_classes)(data.global_test_x)
    accuracy = float((logits.argmax(-1) == data.global_test_y).double().mean())
    assert abs(accuracy - summary["global_accuracy"]) <= 1 / len(data.global_test_y)


@torch.no_grad()
def test_tiers_concatenated_along_rank_export_as_one_merged_adapter(tmp_path):
    """A root + cluster + leaf method evaluates tiers concatenated along r; peft must see the sum."""
    model_cfg = ModelConfig(name="vit_tiny_patch16_224",
                            kwargs=dict(img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"])
    model = build_cohort_model(model_cfg, lora, num_classes=5, seed=0)
    g = torch.Generator().manual_seed(1)
    tiers = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in model.init_adapters(1, g).items()}
             for _ in range(3)]
    merged = {k: torch.cat([t[k] for t in tiers], dim=1) if k.endswith("lora_A") else
              torch.cat([t[k] for t in tiers], dim=2) if k.endswith("lora_B") else tiers[0][k] for k in tiers[0]}
    write_peft_adapter(merged, model_cfg=model_cfg, lora_cfg=lora, num_classes=5, seed=0, out=tmp_path / "m")
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {12} and set(config["alpha_pattern"].values()) == {24}
    x = torch.randn(6, 3, 16, 16, generator=g)
    backbone, _, call = build_backbone(model_cfg, num_classes=5, seed=0)
    peft_model = PeftModel.from_pretrained(backbone, str(tmp_path / "m")).eval()
    ours = model(x, {k: v.expand(6, *v.shape[1:]) for k, v in merged.items()})
    torch.testing.assert_close(call(peft_model, x), ours, rtol=1e-5, atol=1e-5)
    # the merged update is the sum of the tiers' updates: s * [B1 B2 B3][A1; A2; A3] = s * sum_i B_i A_i
    key = model.targets[0]
    dense = sum(t[f"{key}.lora_B"][0].double() @ t[f"{key}.lora_A"][0].double() for t in tiers)
    lora_layer = peft_model.base_model.model.get_submodule(key)
    delta = lora_layer.get_delta_weight("default").double()
    torch.testing.assert_close(delta, dense * 2.0, rtol=1e-5, atol=1e-6)

"""`fedhpc export`: a client's personalized model (or the global one) as a peft adapter folder.

    fedhpc export runs/quickstart --client 3 --out exports/client3
    fedhpc export runs/quickstart --global --out exports/global

    backbone, _, _ = build_backbone(cfg.model, num_classes=..., seed=cfg.seed)   # the run's backbone
    model = PeftModel.from_pretrained(backbone, "exports/client3")               # same logits as fedhpc

The adapters are whatever the strategy evaluates the client with (`strategy.personalized`,
or `strategy.global_model`), read from the run's newest good checkpoint. Methods with several
tiers (root + cluster + leaf) hand back their tiers concatenated along the rank dimension, and
`[B_1 B_2 B_3] [A_1; A_2; A_3] = B_1 A_1 + B_2 A_2 + B_3 A_3` is exactly one merged LoRA of the
summed rank: each module's rank is read from the tensors (peft `rank_pattern`), and its
`lora_alpha` keeps fedhpc's scaling `lora.lora_alpha / lora.r` (peft `alpha_pattern`). The
classifier head is saved whole (`modules_to_save`). peft writes the folder itself
(`adapter_config.json`, `adapter_model.safetensors`), so the format is peft's own.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["export_adapter", "write_peft_adapter"]


def write_peft_adapter(adapters: dict[str, torch.Tensor], *, model_cfg, lora_cfg, num_classes: int, seed: int,
                       out: str | Path) -> Path:
    """Save adapters `[1, ...]` (fedhpc keys) as a peft LoRA folder for the run's backbone."""
    from peft import LoraConfig, get_peft_model

    from ..models.backbone import build_backbone

    backbone, head, _ = build_backbone(model_cfg, num_classes=num_classes, seed=seed)
    modules = sorted({k.rsplit(".", 1)[0] for k in adapters if k.endswith(".lora_A")})
    scaling = lora_cfg.lora_alpha / lora_cfg.r
    ranks = {m: int(adapters[f"{m}.lora_A"].shape[1]) for m in modules}
    other = {m: r for m, r in ranks.items() if r != lora_cfg.r}
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.lora_alpha, target_modules=modules,
                        lora_dropout=lora_cfg.lora_dropout, modules_to_save=[head],
                        rank_pattern=other, alpha_pattern={m: scaling * r for m, r in other.items()})
    peft_model = get_peft_model(backbone, config)
    state = {}
    for m in modules:
        state[f"base_model.model.{m}.lora_A.default.weight"] = adapters[f"{m}.lora_A"][0]
        state[f"base_model.model.{m}.lora_B.default.weight"] = adapters[f"{m}.lora_B"][0]
    for name in ("weight", "bias"):
        state[f"base_model.model.{head}.modules_to_save.default.{name}"] = adapters[f"head.{name}"][0]
    result = peft_model.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in state.items()},
                                        strict=False)
    missing = [k for k in result.missing_keys if ".lora_" in k or "modules_to_save" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"export: adapters do not fit the backbone (unexpected {result.unexpected_keys[:3]}, "
                         f"missing {missing[:3]})")
    out = Path(out)
    peft_model.save_pretrained(str(out))
    return out


def export_adapter(run_dir: str | Path, *, client: int | None, out: str | Path) -> Path:
    """Export client `client`'s personalized adapters (None: the global model) of a run."""
    from mpi4py import MPI

    from ..config import ExperimentConfig
    from ..configtree import build
    from ..experiment import _setup
    from .checkpoint import find_resumable, load, read_config

    comm = MPI.COMM_SELF
    path = find_resumable(run_dir, comm=comm)
    if path is None:
        raise FileNotFoundError(f"export: no usable checkpoint in {Path(run_dir) / 'checkpoints'} "
                                f"(runs write one when checkpoint.every > 0)")
    cfg = build(ExperimentConfig, {**read_config(path), "device": "cpu"})
    if client is not None and not 0 <= client < cfg.num_clients:
        raise ValueError(f"export: --client must be in [0, {cfg.num_clients}), got {client}")
    r = _setup(cfg, comm)
    ids = np.array([0 if client is None else client])
    saved = load(path, clients=ids, device="cpu")
    if client is None:
        adapters = r.strategy.global_model(saved.server, r.init)
        if adapters is None:
            raise ValueError(f"export: strategy '{cfg.strategy.name}' has no global model; export a --client")
    else:
        adapters = r.strategy.personalized(saved.server, saved.clients, ids)
    return write_peft_adapter(adapters, model_cfg=cfg.model, lora_cfg=cfg.lora, num_classes=r.data.num_classes,
                              seed=cfg.seed, out=out)

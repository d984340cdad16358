"""Opt-in fast paths of local training: bf16 autocast and a compiled cohort forward + backward.

Both are off by default (`train.precision: fp32`, `train.compile: false`), and then local training
runs exactly the eager float32 ops it always ran (the golden runs check it, bit for bit on the CPU
they were recorded on).

- `train.precision: bf16` runs the forward under `torch.autocast(dtype=bfloat16)`: the frozen
  backbone's matmuls, linear layers and attention take bf16 inputs. The adapters' own products
  (`CohortLoRALinear` computes `s (x Aᵀ) Bᵀ` with autocast off, in float32), the classifier head,
  the loss and its per-client reduction stay float32, and so do the adapters, their gradients
  (autograd casts back to each leaf's dtype) and the optimizer state.
- `train.compile: true` wraps the backbone call in `torch.compile(dynamic=False)`: TorchDynamo
  traces the forward with the bound adapters as graph inputs, AOTAutograd derives the backward
  from the same joint graph, and inductor fuses both (C++/OpenMP on CPU, Triton on GPU).
  Shapes are static: one graph per pass size `C` (every client gets exactly `batch_size` rows
  per step, padded and masked, so a pass's shapes depend on `C` only, and `split_passes` makes at
  most two sizes per round: `clients_per_pass` and the last pass's). The compiled function is
  cached on the model, so round 2 onwards finds its graphs and compiles nothing
  (`tests/test_fused.py` counts graph compilations with `torch._dynamo.utils.counters`).
  Inductor reorders and fuses float32 sums, so results differ from eager by float32 rounding:
  it stays opt-in.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from ..models.cohort import CohortModel

__all__ = ["precision_context", "cohort_forward", "compile_count"]


def precision_context(precision: str, device: torch.device):
    """The context the cohort forward runs in: nothing for fp32, bf16 autocast for bf16 (and, where
    torch's fused bf16 attention cannot run, its plain-matmul attention)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)
        if device.type != "cpu" or not _fused_bf16_attention_fails():
            return autocast
        from torch.nn.attention import SDPBackend, sdpa_kernel

        both = contextlib.ExitStack()
        both.enter_context(autocast)
        both.enter_context(sdpa_kernel(SDPBackend.MATH))
        return both
    raise ValueError(f"train.precision must be fp32 or bf16, got '{precision}'")


@functools.cache
def _fused_bf16_attention_fails() -> bool:
    """On a CPU with bf16 hardware (AVX512-BF16) torch's fused bf16 attention packs its inputs with
    AVX-512 code, absent from the AVX2 kernels fedhpc pins (fedhpc.CPU_KERNELS): from 65 tokens on it
    raises "pack_vnni2 is only supported when avx512 is supported"."""
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        return False
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags


def cohort_forward(model: CohortModel, *, compile: bool):
    """`f(x, adapters, scaling=, dropout_keys=) -> logits`: the model itself, or its compiled
    twin (built once per model and kept on it, so later passes and rounds reuse its graphs)."""
    if not compile:
        return model
    compiled = model.__dict__.get("_fedhpc_compiled")
    if compiled is None:
        # only the backbone call is compiled; binding the adapters (a context manager that sets
        # and clears plain attributes) stays eager, and dynamo reads them as graph inputs
        backbone = torch.compile(lambda x: model.call_backbone(model.backbone, x), dynamic=False,
                                 backend="inductor")

        def compiled(x, adapters, *, scaling=None, dropout_keys=None):
            with model.bind(adapters, scaling=scaling, dropout_keys=dropout_keys):
                return backbone(x)

        model.__dict__["_fedhpc_compiled"] = compiled
    return compiled


def compile_count() -> int:
    """Graphs TorchDynamo has compiled in this process so far (a recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])

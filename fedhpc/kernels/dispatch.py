"""Backend choice for every kernel: an ordered list, the first available backend wins.

Order is cuda, triton, torch (the reference comes last and is always available).
Triton and CUDA serve tensors on a CUDA device; Triton also runs CPU tensors under
``TRITON_INTERPRET=1``, but only when forced, because the interpreter is slow and
exists for tests. ``FEDHPC_KERNELS=torch|triton|cuda`` or ``backend=`` forces one
backend; a forced backend that cannot run raises with every backend's reason.
Optional backends are imported lazily, so a missing triton or an unbuilt
``fedhpc._cuda`` is never an import error.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch

Backend = Literal["cuda", "triton", "torch"]
BACKENDS: tuple[Backend, ...] = ("cuda", "triton", "torch")
ENV_VAR = "FEDHPC_KERNELS"


@dataclass(frozen=True)
class Impl:
    """One backend of one op.

    ``module`` is imported only when the backend is chosen; ``fn`` names the entry
    point there. ``unsupported(*tensors)`` returns why this backend cannot take these
    inputs (dtype, size limits), or None.
    """

    backend: Backend
    module: str
    fn: str
    unsupported: Callable[..., str | None] = lambda *tensors: None


def requested_backend(backend: Backend | None = None) -> Backend | None:
    """The forced backend: the keyword wins over ``FEDHPC_KERNELS``; None means automatic."""
    name = backend if backend is not None else (os.environ.get(ENV_VAR) or None)
    if name is not None and name not in BACKENDS:
        source = "backend=" if backend is not None else f"{ENV_VAR}="
        raise ValueError(f"{source}{name!r} is not a backend; choose one of {BACKENDS}")
    return name


@functools.cache
def cuda_extension():
    """The compiled ``fedhpc._cuda`` module, or the ImportError explaining its absence."""
    try:
        return importlib.import_module("fedhpc._cuda")
    except ImportError as err:
        return err


def _platform_reason(backend: Backend, device: torch.device, forced: bool) -> str | None:
    """Why ``backend`` cannot run on ``device`` at all (None: it can)."""
    if backend == "torch":
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if forced and os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return (f"tensors are on {device.type}; Triton needs CUDA tensors, or "
                "TRITON_INTERPRET=1 together with a forced triton backend")
    if device.type != "cuda":
        return f"tensors are on {device.type}; the CUDA kernels need CUDA tensors"
    ext = cuda_extension()
    if isinstance(ext, ImportError):
        return f"fedhpc._cuda is not built (FEDHPC_BUILD_CUDA=1 pip install -e .): {ext}"
    return None


def select(op: str, impls: Sequence[Impl], *tensors: torch.Tensor,
           backend: Backend | None = None) -> Callable:
    """Return the implementation of ``op`` that runs these tensors.

    ``tensors`` are the op's inputs (the first one's device decides); they are handed
    to each backend's ``unsupported`` check.
    """
    forced = requested_backend(backend)
    device = tensors[0].device
    reasons: dict[str, str] = {}
    for impl in impls:
        if forced is not None and impl.backend != forced:
            continue
        why = _platform_reason(impl.backend, device, forced is not None) or impl.unsupported(*tensors)
        if why is None:
            return getattr(importlib.import_module(impl.module), impl.fn)
        reasons[impl.backend] = why
    for name in BACKENDS:
        if name not in {impl.backend for impl in impls}:
            reasons[name] = f"{op} has no {name} implementation"
    detail = "; ".join(f"{name}: {reasons[name]}" for name in BACKENDS if name in reasons)
    raise RuntimeError(f"{op}: forced backend {forced!r} is unavailable ({detail})")


def available_backends(device: torch.device | str = "cpu") -> dict[Backend, str | None]:
    """Each backend's platform status on ``device`` in automatic mode (None: usable)."""
    device = torch.device(device)
    return {name: _platform_reason(name, device, forced=False) for name in BACKENDS}

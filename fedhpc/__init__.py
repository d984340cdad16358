"""fedhpc: an MPI simulator for federated LoRA fine-tuning. `fedhpc.run(config, overrides=[...])` runs an
experiment from Python (fedhpc/api.py); `fedhpc run CONFIG` from the shell (fedhpc/cli.py)."""
import os

__version__ = "0.1.0"

CPU_KERNELS = "avx2"
"""torch's CPU kernels are pinned to AVX2 (unless ATEN_CPU_CAPABILITY is set). With AVX-512, an
elementwise op rounds a tensor's last, partial block of 32 floats otherwise than the rest (sigmoid of
64 floats at once against 48 then 16: floats 32-47 differ by an ulp), so a client's numbers changed
with the clients sharing its pass and so with the rank count. torch reads the variable when it first
picks a kernel: importing fedhpc before any torch op runs is enough (make_world checks)."""
os.environ.setdefault("ATEN_CPU_CAPABILITY", CPU_KERNELS)

__all__ = ["run", "resolve_config", "ConfigError", "__version__"]


def __getattr__(name):  # lazy: `fedhpc --version` and `import fedhpc` stay quick (no torch)
    if name in ("run", "resolve_config"):
        from . import api

        return getattr(api, name)
    if name == "ConfigError":
        from .configtree import ConfigError

        return ConfigError
    raise AttributeError(f"module 'fedhpc' has no attribute {name!r}")

"""fedhpc: an MPI simulator for federated LoRA fine-tuning. `fedhpc.run(config, overrides=[...])` runs an
experiment from Python (fedhpc/api.py); `fedhpc run CONFIG` from the shell (fedhpc/cli.py)."""
__version__ = "0.1.0"

__all__ = ["run", "resolve_config", "ConfigError", "__version__"]


def __getattr__(name):  # lazy: `fedhpc --version` and `import fedhpc` stay quick (no torch)
    if name in ("run", "resolve_config"):
        from . import api

        return getattr(api, name)
    if name == "ConfigError":
        from .configtree import ConfigError

        return ConfigError
    raise AttributeError(f"module 'fedhpc' has no attribute {name!r}")

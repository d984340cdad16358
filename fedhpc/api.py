"""The Python API: `fedhpc.run(config, overrides=[...])`, the same run as `fedhpc run` from a notebook,
a sweep script or a test.

    import fedhpc
    summary = fedhpc.run("configs/quickstart.yaml", overrides=["rounds=2", "strategy.name=fedsa_lora"])
    summary = fedhpc.run({"rounds": 2, "data": {"name": "digits"}})       # a dict: defaults fill the rest
    summary = fedhpc.run(cfg)                                              # an ExperimentConfig

In one process it runs alone (MPI starts as a one-rank world, no `mpiexec` needed); under
`mpiexec -n N python script.py` every rank calls it and they run one experiment together, as
`fedhpc run` does. Every rank returns the same summary (the dict of `runs/<name>/summary.json`).
A bad config raises `fedhpc.ConfigError` (a ValueError) naming the dotted key.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["run", "resolve_config"]


def resolve_config(config, overrides=()):
    """An `ExperimentConfig` from a YAML path, a nested dict or an `ExperimentConfig`, with
    `a.b=value` overrides applied (checked as the CLI checks them)."""
    from .config import ConfigError, ExperimentConfig, load_config, to_dict
    from .configtree import apply_overrides, build

    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    if isinstance(config, (str, Path)):
        return load_config(config, overrides)
    if isinstance(config, ExperimentConfig):
        return build(ExperimentConfig, apply_overrides(to_dict(config), overrides)) if overrides else config
    if isinstance(config, dict):
        return build(ExperimentConfig, apply_overrides(config, overrides))
    raise ConfigError(f"config must be a YAML path, a dict or an ExperimentConfig, got {type(config).__name__}")


def run(config, overrides=(), *, progress: bool = True, comm=None, resume: str | Path | None = None) -> dict:
    """Run one experiment and return its summary (identical on every rank).

    Args:
        config: a YAML file path, a nested dict (missing keys take their defaults) or an ExperimentConfig.
        overrides: dotted `key=value` strings applied on top, e.g. `["rounds=3", "train.local_epochs=2"]`.
        progress: print progress on rank 0 (a live bar on a terminal, plain lines otherwise).
        comm: the MPI communicator of the ranks sharing this run (default: MPI.COMM_WORLD).
        resume: a checkpoint file to continue from (`fedhpc.io.checkpoint.find_resumable` finds one).
    """
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    cfg = resolve_config(config, overrides)
    from .experiment import run as run_experiment
    from .runtime.world import check_launch

    check_launch(comm)
    return run_experiment(cfg, comm=comm, progress=progress, resume=resume)

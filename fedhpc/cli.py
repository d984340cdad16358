"""`fedhpc run | bench`: the one entry point, unchanged under python, mpiexec and srun.

    fedhpc run configs/quickstart.yaml strategy.name=ffa_lora train.local_epochs=2
    mpiexec -n 4 fedhpc run configs/quickstart.yaml
    fedhpc bench kernels | throughput

This is the only module that touches MPI.COMM_WORLD.
"""
from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main"]

BENCHES = {"kernels": "bench/kernels.py", "throughput": "bench/throughput.py"}


def _fail(message: str, *, code: int, comm=None) -> int:
    if comm is None or comm.Get_rank() == 0:
        print(f"fedhpc: error: {message}", file=sys.stderr)
    return code


def _run(args) -> int:
    from mpi4py import MPI

    from .runtime.world import check_launch

    comm = MPI.COMM_WORLD
    try:
        check_launch(comm)  # before torch loads: a broken launch fails in a second
    except RuntimeError as err:  # N one-rank copies: only Slurm's first task says so
        return _fail(str(err), code=2) if os.environ.get("SLURM_PROCID", "0") == "0" else 2
    from .config import ConfigError, load_config
    from .experiment import run

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        return _fail(str(err), code=2, comm=comm)
    try:
        run(cfg, comm=comm, progress=not args.quiet)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        # Raised identically on every rank (same config, same data): each exits cleanly.
        return _fail(str(err).splitlines()[0], code=2, comm=comm)
    except BaseException:
        if comm.Get_size() > 1:  # one rank failing alone would leave the others waiting forever
            import traceback

            traceback.print_exc()
            comm.Abort(1)
        raise
    return 0


def _bench(args) -> int:
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / BENCHES[args.which]
    if not script.is_file():
        return _fail(f"benchmark script {script} not found (benchmarks run from a source checkout)", code=2)
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedhpc", description="MPI simulator for federated LoRA fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run a federated experiment from a YAML config")
    p_run.add_argument("config", help="YAML config file (see configs/)")
    p_run.add_argument("overrides", nargs="*", help="dotted overrides such as train.local_epochs=2")
    p_run.add_argument("--quiet", action="store_true", help="no progress lines")
    p_run.set_defaults(func=_run)
    p_bench = sub.add_parser("bench", help="run a benchmark from bench/")
    p_bench.add_argument("which", choices=sorted(BENCHES))
    p_bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    p_bench.set_defaults(func=_bench)
    args, extra = parser.parse_known_args(argv)
    # overrides may come after options (`run cfg.yaml --quiet a.b=1`): argparse leaves them over
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and args.command != "run"):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

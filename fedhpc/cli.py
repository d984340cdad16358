"""`fedhpc run | sweep | report | export | inspect | bench`: one entry point, the same under python, mpiexec, srun.

    fedhpc run configs/quickstart.yaml strategy.name=ffa_lora train.local_epochs=2
    mpiexec -n 4 fedhpc run configs/quickstart.yaml
    mpiexec -n 2 fedhpc run configs/quickstart.yaml --resume auto    # continue if a checkpoint exists
    fedhpc run --resume runs/quickstart                              # continue from the run's checkpoint
    fedhpc report runs/a runs/b --out reports/ab
    fedhpc export runs/quickstart --client 3 --out exports/client3   # or --global
    fedhpc inspect runs/quickstart/checkpoints/round-000005.h5
    fedhpc bench kernels | throughput | checkpoint
    fedhpc sweep configs/sweeps/hilora_latent.yaml [--dry-run | --point I | --table]   # fedhpc/sweep.py

Exit codes: 0 done, 1 crash, 2 bad input (one line naming what to fix), 75 preempted by
SIGTERM / SIGUSR1 after writing a checkpoint (fedhpc.runtime.preempt), 74 the disk filled up
while writing the run directory (one line; a checkpoint that cannot be written is only a warning:
the previous one is kept and the run goes on).

This is the only module that touches MPI.COMM_WORLD.
"""
from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main"]

DISK_FULL_EXIT_CODE = 74  # EX_IOERR in sysexits.h
DISK_FULL = (28, 122, 27)  # ENOSPC, EDQUOT, EFBIG (a file-size limit)
AGREE_S = 30.0
"""How long a rank that raised an expected error waits for every other rank to raise one too."""
STDIO_DRAIN_S = 2.0
"""Longest wait, before MPI_Abort, for the launcher to read what this rank wrote to stdout / stderr."""
BENCHES = {"kernels": "bench/kernel_speed.py", "throughput": "bench/throughput.py", "checkpoint": "bench/checkpoint.py"}


def _fail(message: str, *, code: int, comm=None) -> int:
    if comm is None or comm.Get_rank() == 0:
        print(f"fedhpc: error: {message}", file=sys.stderr)
    return code


def _abort(comm, code: int) -> None:
    """MPI_Abort once the launcher has read this rank's stdout and stderr. mpiexec (hydra) takes the
    abort and the output from different pipes and ends every rank as soon as it sees the abort, so a
    traceback still in the pipe was lost (4 aborts of 30 here): wait, at most STDIO_DRAIN_S,
    until the pipes are empty. Output to a file or a terminal has nothing to wait for."""
    import array
    import fcntl
    import stat
    import termios
    import time

    sys.stdout.flush()
    sys.stderr.flush()
    pipes = [fd for fd in (1, 2) if stat.S_ISFIFO(os.fstat(fd).st_mode)]
    unread = array.array("i", [0])
    deadline = time.monotonic() + STDIO_DRAIN_S
    for fd in pipes:
        while fcntl.ioctl(fd, termios.FIONREAD, unread) == 0 and unread[0] and time.monotonic() < deadline:
            time.sleep(0.01)
    comm.Abort(code)


def _expected_error(message: str, comm, errors) -> int:
    """Exit 2 with one line. A config error or a missing file is raised on every rank alike, and then
    rank 0 says it once; raised on some ranks only (data one rank reads), the others would wait forever
    in a collective. So the ranks that raised wait, at most AGREE_S, on a barrier of their own
    communicator `errors` (a duplicate of `comm`, so it cannot match a collective the other ranks are
    in): when every rank arrives, rank 0 says it once; when not, each says it with its rank and aborts."""
    if errors is None:
        return _fail(message, code=2)
    import time

    arrived = errors.Ibarrier()
    deadline = time.monotonic() + AGREE_S
    while not arrived.Test():
        if time.monotonic() > deadline:
            print(f"fedhpc: error: on rank {comm.Get_rank()}, not on every rank: {message}", file=sys.stderr)
            _abort(comm, 2)
        time.sleep(0.01)
    return _fail(message, code=2, comm=comm)


def _resolve(args, comm):
    """(config, checkpoint to resume from or None) for `fedhpc run`."""
    from pathlib import Path

    from .config import ConfigError, ExperimentConfig, load_config, to_dict
    from .configtree import apply_overrides, build
    from .io.checkpoint import find_resumable, read_config, resume_config, saved_round

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).is_file():  # `run --resume DIR a.b=1`
        config, overrides = None, [config, *overrides]
    if args.resume is None or args.resume == "auto":
        if config is None:
            raise ConfigError("run: name a config file" + (" (--resume auto finds the run directory from it)"
                                                           if args.resume else " or --resume RUN_DIR"))
        cfg = load_config(config, overrides)
        if args.resume is None:
            return cfg, None
        run_dir = Path(cfg.out_dir) / cfg.name
    else:
        run_dir = Path(args.resume)
        if not run_dir.is_dir():
            raise ConfigError(f"--resume: run directory '{run_dir}' does not exist")
    say = (lambda line: print(line, flush=True)) if comm.Get_rank() == 0 else (lambda line: None)
    path = find_resumable(run_dir, comm=comm, say=say)
    if path is None:
        if args.resume == "auto":
            say(f"fedhpc: no usable checkpoint in {run_dir}; starting the run from round 1")
            return cfg, None
        raise ConfigError(f"--resume: no usable checkpoint in {run_dir / 'checkpoints'}")
    stored = read_config(path)
    if args.resume == "auto":
        requested = to_dict(cfg)
    else:
        base = stored if config is None else to_dict(load_config(config, []))
        requested = to_dict(build(ExperimentConfig, {**apply_overrides(base, overrides),
                                                      "out_dir": str(run_dir.parent), "name": run_dir.name}))
    cfg = build(ExperimentConfig, resume_config(stored, requested, saved_round=saved_round(path)))
    return cfg, path


def _run(args) -> int:
    return _guarded(args, lambda comm, guard: _run_body(args, comm, guard),
                    expected=lambda: (ValueError, FileNotFoundError, FloatingPointError))


def _run_body(args, comm, guard) -> int:
    from .experiment import run

    cfg, resume = _resolve(args, comm)
    run(cfg, comm=comm, progress=not args.quiet, resume=resume, guard=guard)
    return 0


def _guarded(args, body, *, expected, preempted: str = "") -> int:
    """`body(comm, guard)` on every rank of MPI.COMM_WORLD, as `fedhpc run` and `fedhpc sweep` share it:
    the errors `expected()` names (a function, called once the launch is checked, since their modules
    may load torch) are one line and exit 2 (_expected_error), a preemption exits 75, a full disk is
    one line and exit 74, and any other exception prints its traceback and, with more than one rank,
    aborts every rank (one rank failing alone would leave the others waiting forever in a collective)."""
    from .runtime.preempt import PreemptionGuard

    # First thing: a SIGTERM / SIGUSR1 during start-up stops the run after round 1 with a checkpoint.
    # As the program (`fedhpc run`, `python -m fedhpc run`), once the run is over (done, preempted or
    # failed) the signals are ignored until the process has exited, so one that arrives while it
    # finalizes (MPI, torch: seconds) cannot turn its exit status 0 or 75 into "killed by a signal"
    # (Python resets the handlers it set to the default, fatal, action while it finalizes, but not
    # SIG_IGN). Called from Python (`main([...])`), the caller's handlers come back instead.
    guard = PreemptionGuard().__enter__()
    try:
        return _on_every_rank(body, guard, expected=expected, preempted=preempted)
    finally:
        if args.program:
            import signal

            for sig in guard.previous:
                signal.signal(sig, signal.SIG_IGN)
        else:
            guard.__exit__(None, None, None)


def _on_every_rank(body, guard, *, expected, preempted: str) -> int:
    from mpi4py import MPI

    from .runtime.world import check_launch

    comm = MPI.COMM_WORLD
    try:
        check_launch(comm)  # before torch loads: a broken launch fails in a second
    except RuntimeError as err:  # N one-rank copies: only Slurm's first task says so
        return _fail(str(err), code=2) if os.environ.get("SLURM_PROCID", "0") == "0" else 2
    from .runtime.preempt import PREEMPTED_EXIT_CODE, Preempted

    expected = expected()
    errors = comm.Dup() if comm.Get_size() > 1 else None  # its own communicator: see _expected_error
    try:
        return body(comm, guard)
    except Preempted as stop:
        if comm.Get_rank() == 0:
            print(f"fedhpc: {stop}{preempted}", flush=True)
        return PREEMPTED_EXIT_CODE
    except expected as err:
        return _expected_error(str(err).splitlines()[0], comm, errors)
    except BaseException as err:  # one handler: an error re-raised by another `except` would escape the abort
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            # Rank 0 writes the run directory alone: one line, and the other ranks end with it.
            print(f"fedhpc: error: disk full: {err}; the run stops, its last complete checkpoint kept: free space "
                  f"and run again with --resume auto", file=sys.stderr, flush=True)
            if comm.Get_size() > 1:
                _abort(comm, DISK_FULL_EXIT_CODE)
            return DISK_FULL_EXIT_CODE
        if comm.Get_size() > 1:  # one rank failing alone would leave the others waiting forever
            import traceback

            sys.stderr.write(traceback.format_exc())  # one write: line by line, mpiexec lost all but the first
            _abort(comm, 1)
        raise
    finally:
        if errors is not None:
            errors.Free()


def _inspect(args) -> int:
    from .io.checkpoint import CheckpointError, describe

    try:
        text, ok = describe(args.file)
    except (CheckpointError, FileNotFoundError) as err:
        return _fail(str(err).splitlines()[0], code=1)
    print(text)
    return 0 if ok else 1


def _export(args) -> int:
    from .io.export import export_adapter

    try:
        out = export_adapter(args.run_dir, client=None if args.global_model else args.client, out=args.out)
    except (ValueError, FileNotFoundError) as err:
        return _fail(str(err).splitlines()[0], code=2)
    what = "global model" if args.global_model else f"client {args.client}"
    print(f"fedhpc: exported the {what} of {args.run_dir} to {out} (load with peft.PeftModel.from_pretrained)")
    return 0


def _report(args) -> int:
    from .io.report import write_report

    try:
        written = write_report(args.runs, args.out)
    except (FileNotFoundError, ValueError) as err:
        return _fail(str(err).splitlines()[0], code=2)
    print(f"fedhpc: report of {len(args.runs)} run(s) in {written[3]}")
    return 0


def _sweep(args) -> int:
    """`fedhpc sweep`: methods x options x seeds, tuned on tuning seeds, one table (fedhpc/sweep.py)."""
    def body(comm, guard):
        from .sweep import main as sweep_main

        return sweep_main(args, comm, guard=guard)

    def expected():  # not every ValueError: a point's own (a diverged run) is recorded by fedhpc/sweep.py
        from .configtree import ConfigError
        from .io.checkpoint import CheckpointError

        return ConfigError, CheckpointError, FileNotFoundError

    return _guarded(args, body, expected=expected, preempted="; run the sweep again to go on")


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
    from . import __version__

    parser = argparse.ArgumentParser(prog="fedhpc", description="MPI simulator for federated LoRA fine-tuning")
    parser.add_argument("--version", action="version", version=f"fedhpc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run a federated experiment from a YAML config")
    p_run.add_argument("config", nargs="?", help="YAML config file (see configs/); optional with --resume RUN_DIR")
    p_run.add_argument("overrides", nargs="*", help="dotted overrides such as train.local_epochs=2")
    p_run.add_argument("--quiet", action="store_true", help="no progress lines")
    p_run.add_argument("--resume", metavar="auto|RUN_DIR",
                       help="continue from the newest good checkpoint of RUN_DIR (its config), or with 'auto' "
                            "of the config's run directory if it has one (else start)")
    p_run.set_defaults(func=_run)
    p_report = sub.add_parser("report", help="plots and a Markdown table comparing run directories")
    p_report.add_argument("runs", nargs="+", help="run directories (runs/<name>)")
    p_report.add_argument("--out", required=True, help="folder for the PNG plots and report.md")
    p_report.set_defaults(func=_report)
    p_export = sub.add_parser("export", help="a client's (or the global) adapters as a peft folder")
    p_export.add_argument("run_dir", help="run directory with checkpoints (runs/<name>)")
    which = p_export.add_mutually_exclusive_group(required=True)
    which.add_argument("--client", type=int, help="client id whose personalized model to export")
    which.add_argument("--global", dest="global_model", action="store_true", help="export the global model")
    p_export.add_argument("--out", required=True, help="folder to write (adapter_config.json + safetensors)")
    p_export.set_defaults(func=_export)
    p_inspect = sub.add_parser("inspect", help="contents and checksum status of a checkpoint file")
    p_inspect.add_argument("file", help="checkpoint file (runs/<name>/checkpoints/round-*.h5)")
    p_inspect.set_defaults(func=_inspect)
    p_sweep = sub.add_parser("sweep", help="methods x options x seeds with tuned learning rates, one table")
    p_sweep.add_argument("sweep", help="sweep file (configs/sweeps/*.yaml; format in fedhpc/sweep.py)")
    what = p_sweep.add_mutually_exclusive_group()
    what.add_argument("--dry-run", action="store_true", help="list the points known now and their state")
    what.add_argument("--point", type=int, help="run only point I of --dry-run's list (a Slurm array task)")
    what.add_argument("--table", action="store_true", help="write the table from the finished points only")
    p_sweep.set_defaults(func=_sweep)
    p_bench = sub.add_parser("bench", help="run a benchmark from bench/")
    p_bench.add_argument("which", choices=sorted(BENCHES))
    p_bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    p_bench.set_defaults(func=_bench)
    args, extra = parser.parse_known_args(argv)
    args.program = argv is None  # the command line, not a call from Python
    # overrides may come after options (`run cfg.yaml --quiet a.b=1`): argparse leaves them over
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray or (extra and args.command != "run"):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

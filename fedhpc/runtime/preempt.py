"""Preemption: SIGTERM or SIGUSR1 stop the run after the current round, with a checkpoint.

Slurm signals a job before killing it (`--signal=USR1@<seconds>` in slurm/*.sbatch reaches
every rank; SIGTERM at preemption and time-out), to every task or only to some. The handler
only sets a flag; at the end of each round the ranks agree on it with one 4-byte `Allreduce(MAX)` (so one signalled rank is
enough), every rank writes that round's checkpoint synchronously, rank 0 prints

    fedhpc: preempted after round N; checkpoint <path>; resume with --resume auto

and the process exits with `PREEMPTED_EXIT_CODE` (75, EX_TEMPFAIL in sysexits.h: "try again
later"), which job scripts test to requeue. A signal that arrives after the last round lets
the run finish normally (its final checkpoint is already written).

`fedhpc run` installs the handlers first thing and keeps them until the process exits, so a
signal is never fatal: one during start-up stops the run after round 1, one after the last round
is ignored (exit 0). A signal that killed the process (SIGUSR1's default action is to terminate)
would leave the job script a status other than 75 and the job would end FAILED, not requeued.

Slurm gives the ranks `KillWait` seconds (default 30; `GraceTime` for preemption) between SIGTERM
and SIGKILL: a round plus a checkpoint should fit in it, or the previous round's checkpoint is
used (checkpoints are complete or absent). `--signal=USR1@<s>` sets the lead time yourself.

Test hook (tests/test_slurm.py, tests/test_checkpoint.py): with `FEDHPC_HOLD_AFTER_ROUND=N` in
the environment the ranks stop after round N and wait, polling the agreement, until some rank
is signalled (at most `FEDHPC_HOLD_SECONDS`, default 600), after rank 0 prints
`fedhpc: holding after round N until SIGTERM / SIGUSR1`; a test then interrupts the run at a
known round instead of racing it.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np

__all__ = ["PREEMPTED_EXIT_CODE", "SIGNALS", "Preempted", "PreemptionGuard", "hold_for_signal"]

PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped early on a signal, after writing the checkpoint of `round`."""

    def __init__(self, round_index: int, path):
        super().__init__(f"preempted after round {round_index}; checkpoint {path}; resume with --resume auto")
        self.round = round_index
        self.path = path


class PreemptionGuard:
    """Context manager: catches SIGNALS while the run lasts, restores the old handlers after
    (`fedhpc run` enters one for the whole process and never leaves it)."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def _handle(self, signum, frame):
        self.requested = True  # only a flag: the round loop acts on it at a safe point

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False

    def agreed(self, *, comm) -> bool:
        """Collective: True on every rank if any rank was signalled."""
        from mpi4py import MPI

        flag = np.array([int(self.requested)], dtype=np.int32)
        out = np.zeros_like(flag)
        comm.Allreduce([flag, MPI.INT], [out, MPI.INT], op=MPI.MAX)
        return bool(out[0])


def hold_for_signal(guard: PreemptionGuard, round_index: int, *, comm, say) -> None:
    """The test hook (module docstring): after round `FEDHPC_HOLD_AFTER_ROUND`, wait until some rank
    is signalled. Collective: every rank reads the same environment and takes the same turns."""
    hold = os.environ.get("FEDHPC_HOLD_AFTER_ROUND")
    if not hold or int(hold) != round_index:
        return
    say(f"fedhpc: holding after round {round_index} until SIGTERM / SIGUSR1 (FEDHPC_HOLD_AFTER_ROUND)")
    deadline = time.monotonic() + float(os.environ.get("FEDHPC_HOLD_SECONDS", "600"))
    while not guard.agreed(comm=comm):
        if comm.allreduce(int(time.monotonic() > deadline)):  # any rank's deadline ends the wait for all
            return
        time.sleep(0.05)

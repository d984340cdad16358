"""Preemption: SIGTERM or SIGUSR1 stop the run after the current round, with a checkpoint.

Slurm signals a job before killing it (`--signal=USR1@<seconds>` in slurm/*.sbatch reaches
every rank; SIGTERM at preemption and time-out), to every task or only to some. The handler
only sets a flag; at the end of each round the ranks agree on it with one 4-byte `Allreduce(MAX)` (so one signalled rank is
enough), every rank writes that round's checkpoint synchronously, rank 0 prints

    fedhpc: preempted after round N; checkpoint <path>; resume with --resume auto

and the process exits with `PREEMPTED_EXIT_CODE` (75, EX_TEMPFAIL in sysexits.h: "try again
later"), which job scripts test to requeue. A signal that arrives after the last round lets
the run finish normally (its final checkpoint is already written).
"""
from __future__ import annotations

import signal
import threading

import numpy as np

__all__ = ["PREEMPTED_EXIT_CODE", "SIGNALS", "Preempted", "PreemptionGuard"]

PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped early on a signal, after writing the checkpoint of `round`."""

    def __init__(self, round_index: int, path):
        super().__init__(f"preempted after round {round_index}; checkpoint {path}; resume with --resume auto")
        self.round = round_index
        self.path = path


class PreemptionGuard:
    """Context manager: catches SIGNALS while the run lasts, restores the old handlers after."""

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

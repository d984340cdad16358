"""The MPI world a run lives in: rank, size, device, threads, and which clients a rank hosts.

Only `fedhpc.cli` touches `MPI.COMM_WORLD`; everything else takes the communicator as an
argument, so `MPI.COMM_SELF` runs the same code in one process.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch loads in make_world, so check_launch runs before the slow import
    import torch

__all__ = ["World", "make_world", "block_range", "check_launch", "local_rank", "srun_tasks"]


def block_range(n: int, size: int, rank: int) -> tuple[int, int]:
    """Contiguous block [start, stop) of n items owned by `rank` of `size` (first ranks get the extra)."""
    q, r = divmod(n, size)
    start = rank * q + min(rank, r)
    return start, start + q + (1 if rank < r else 0)


@dataclass
class World:
    comm: object
    rank: int
    size: int
    device: torch.device
    clients: np.ndarray
    """Ids of the clients this rank hosts (a contiguous block)."""

    @property
    def is_root(self) -> bool:
        return self.rank == 0


def srun_tasks() -> int | None:
    """Tasks in the enclosing srun step (None outside one): what a direct srun launch must match."""
    if os.environ.get("SLURM_STEP_ID") is None:
        return None
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS")
    return int(tasks) if tasks else None


def check_launch(comm) -> None:
    """Under Slurm, srun without working PMI starts N one-rank copies: refuse to run N duplicates.

    A world *larger* than the step is fine: an MPI launcher inside an allocation (MPICH's
    mpiexec) starts its proxies with a one-task srun per node and the ranks inherit that step.
    """
    tasks = srun_tasks()
    if tasks is not None and comm.Get_size() < tasks:
        raise RuntimeError(f"MPI world has {comm.Get_size()} rank(s) but srun started {tasks} tasks, so they "
                           f"would run {tasks} separate copies: launch with `srun --mpi=pmi2` (MPICH) or "
                           f"`--mpi=pmix` (Open MPI); `srun --mpi=list` shows what the cluster offers")


def local_rank(comm) -> tuple[int, int]:
    """(index of this rank among the ranks on its node, ranks on the node).

    When srun started the ranks itself, SLURM_LOCALID is the index Slurm used for its own
    GPU and CPU binding; ranks started by another launcher inherit one stale SLURM_LOCALID,
    so there MPI's shared-memory split decides.
    """
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        index, size = node.Get_rank(), node.Get_size()
    finally:
        node.Free()
    if srun_tasks() == comm.Get_size() and "SLURM_LOCALID" in os.environ:
        index = int(os.environ["SLURM_LOCALID"])
    return index, size


def _device(local_index: int) -> torch.device:
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        index = local_index % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _check_cpu_kernels(chosen: str) -> None:
    """Say so when torch chose its CPU kernels before fedhpc pinned them (fedhpc.CPU_KERNELS): a
    torch op ran before `import fedhpc`, and results may then change with the rank count."""
    from .. import CPU_KERNELS

    if os.environ.get("ATEN_CPU_CAPABILITY") == CPU_KERNELS and chosen == "AVX512":
        print(f"fedhpc: warning: torch uses its {chosen} CPU kernels, chosen before fedhpc was imported; results may "
              f"change with the rank count: import fedhpc before running any torch op", file=sys.stderr, flush=True)


def make_world(comm, *, num_clients: int, device: str = "auto") -> World:
    """Place clients on ranks, pick this rank's device, and share the node's cores among its ranks."""
    import torch

    rank, size = comm.Get_rank(), comm.Get_size()
    if size > num_clients:
        raise ValueError(f"{size} MPI ranks but only {num_clients} clients: use at most {num_clients} ranks")
    local_index, local_size = local_rank(comm)
    # An explicit OMP_NUM_THREADS wins (two runs side by side each asked for 1: taking every
    # core instead oversubscribes them, and OpenMP's spinning workers then slow both ~10x).
    threads = os.environ.get("OMP_NUM_THREADS") or os.environ.get("SLURM_CPUS_PER_TASK")
    torch.set_num_threads(int(threads) if threads else max(1, (os.cpu_count() or 1) // local_size))
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for, but torch sees no GPU on this machine (no CUDA build or "
                         "driver, or CUDA_VISIBLE_DEVICES empty); use device=auto or device=cpu")
    dev = _device(local_index) if device == "auto" else torch.device(device)
    if dev.type == "cpu" and rank == 0:
        _check_cpu_kernels(torch.backends.cpu.get_cpu_capability())
    start, stop = block_range(num_clients, size, rank)
    return World(comm, rank, size, dev, np.arange(start, stop))

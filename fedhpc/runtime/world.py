"""The MPI world a run lives in: rank, size, device, threads, and which clients a rank hosts.

Only `fedhpc.cli` touches `MPI.COMM_WORLD`; everything else takes the communicator as an
argument, so `MPI.COMM_SELF` runs the same code in one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["World", "make_world", "block_range", "check_launch"]


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


def check_launch(comm) -> None:
    """Under Slurm, srun without working PMI starts N one-rank copies: refuse to run N duplicates."""
    tasks = os.environ.get("SLURM_NTASKS") or os.environ.get("SLURM_NPROCS")
    if tasks and os.environ.get("SLURM_STEP_ID") is not None and int(tasks) != comm.Get_size():
        raise RuntimeError(f"MPI world has {comm.Get_size()} rank(s) but Slurm started {tasks} tasks: "
                           f"launch with `srun --mpi=pmi2` (or pmix) so the tasks join one MPI world")


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _local_rank_and_size(comm) -> tuple[int, int]:
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_rank(), node.Get_size()
    finally:
        node.Free()


def make_world(comm, *, num_clients: int, device: str = "auto") -> World:
    """Place clients on ranks, pick this rank's device, and share the node's cores among its ranks."""
    rank, size = comm.Get_rank(), comm.Get_size()
    if size > num_clients:
        raise ValueError(f"{size} MPI ranks but only {num_clients} clients: use at most {num_clients} ranks")
    local_rank, local_size = _local_rank_and_size(comm)
    local_rank = int(os.environ.get("SLURM_LOCALID", local_rank))
    threads = os.environ.get("SLURM_CPUS_PER_TASK")
    torch.set_num_threads(int(threads) if threads else max(1, (os.cpu_count() or 1) // local_size))
    dev = _device(local_rank) if device == "auto" else torch.device(device)
    start, stop = block_range(num_clients, size, rank)
    return World(comm, rank, size, dev, np.arange(start, stop))

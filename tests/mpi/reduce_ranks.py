"""Run by tests/test_reduce.py under mpiexec: each rank contributes its block of clients."""
import json

import numpy as np
import torch
from mpi4py import MPI

from fedhpc.runtime.reduce import GroupReduction
from fedhpc.runtime.world import block_range
from fedhpc.strategies.base import Contribution

SHAPES = {"a": (3, 2), "b": (4,)}
NUM_CLIENTS, NUM_GROUPS = 11, 3


def contributions(ids: np.ndarray) -> Contribution:
    """Client rows depend on the client id only, never on the rank."""
    g = [torch.Generator().manual_seed(int(c)) for c in ids]
    tensors = {k: torch.stack([torch.randn(*s, generator=gi) for gi in g]) for k, s in SHAPES.items()}
    weights = torch.as_tensor(ids % 4 + 1, dtype=torch.float64)
    return Contribution(tensors, weights, torch.as_tensor(ids % NUM_GROUPS), NUM_GROUPS,
                        gathered=dict(tensors), clients=ids)


def main(comm) -> dict:
    lo, hi = block_range(NUM_CLIENTS, comm.size, comm.rank)
    mine = np.arange(lo, hi)
    reduction = GroupReduction(SHAPES, NUM_GROUPS, SHAPES)
    for chunk in np.array_split(mine[::-1], 2):  # passes in any order: the result is sorted by client
        if len(chunk):
            reduction.add(contributions(chunk))
    reduced, _ = reduction.finish(comm=comm)
    return {"means": {k: v.tolist() for k, v in reduced.means.items()}, "weights": reduced.weights.tolist(),
            "gathered": {k: v.tolist() for k, v in reduced.gathered.items()},
            "clients": reduced.gathered_clients.tolist(), "gathered_weights": reduced.gathered_weights.tolist()}


if __name__ == "__main__":
    results = MPI.COMM_WORLD.gather(main(MPI.COMM_WORLD))
    if MPI.COMM_WORLD.rank == 0:
        print(json.dumps(results))  # every rank's copy: they must all agree

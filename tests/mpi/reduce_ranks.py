"""Run by tests/test_reduce.py under mpiexec: each rank adds the uploads of the participants it hosts.

The exchange has two mean blocks with different group assignments and per-client weights (some 0),
and two gathered blocks, one of which leaves out its weight-0 clients.
"""
import json

import numpy as np
import torch
from mpi4py import MPI

from fedhpc.runtime.exchange import Block, Exchange
from fedhpc.runtime.reduce import Reduction
from fedhpc.runtime.world import block_range

NUM_CLIENTS = 11
IDS = np.arange(NUM_CLIENTS)
NUM_EXAMPLES = (IDS % 4 + 1).astype(np.float64)
BIG = 1e6  # what a weight-0 client uploads on top: it would show in any mean it leaked into

# per mean block: groups, group count, weights (None: the clients' sample counts)
MEANS = {
    "a": dict(keys={"a.x": (3, 2), "a.y": (4,)}, groups=IDS % 4, num_groups=4,
              weights=np.where((IDS % 4 == 3) | (IDS == 5), 0.0, IDS % 3 + 1.0)),  # group 3: only weight 0
    "b": dict(keys={"b.z": (2, 5)}, groups=np.minimum(IDS // 3, 4), num_groups=6, weights=None),  # group 5: nobody
}
GATHERS = {
    "g": dict(keys={"g.x": (3, 2), "g.w": (5,)}, weights=np.where(IDS % 3 == 1, 0.0, NUM_EXAMPLES)),
    "h": dict(keys={"h.v": (2,)}, weights=None),
}
SCENARIOS = {
    "most": IDS[IDS != 9],  # client 9 sits the round out
    "first": IDS[:4],  # only rank 0's clients (of 3 ranks): the other ranks join with nothing
}


def exchange() -> Exchange:
    blocks = {name: Block(b["keys"], groups=b["groups"], num_groups=b["num_groups"], weights=b["weights"])
              for name, b in MEANS.items()}
    blocks.update({name: Block(b["keys"], reduce="gather", weights=b["weights"]) for name, b in GATHERS.items()})
    return Exchange(blocks)


def weights(block: dict) -> np.ndarray:
    return NUM_EXAMPLES if block["weights"] is None else block["weights"]


def uploads(ids: np.ndarray) -> dict[str, torch.Tensor]:
    """Client rows depend on the client id only, never on the rank; a client's rows of a mean block
    it has weight 0 in are offset by BIG."""
    out = {}
    for block in [*MEANS.values(), *GATHERS.values()]:
        for key, shape in block["keys"].items():
            rows = []
            for c in ids:
                gen = torch.Generator().manual_seed(1000 * int(c) + sum(map(ord, key)))
                rows.append(torch.randn(*shape, generator=gen))
            out[key] = torch.stack(rows)
    for block in MEANS.values():
        untrained = torch.as_tensor(weights(block)[ids] == 0)
        for key in block["keys"]:
            out[key][untrained] += BIG
    return out


def main(comm, scenario: str = "most") -> dict:
    lo, hi = block_range(NUM_CLIENTS, comm.size, comm.rank)
    participants = SCENARIOS[scenario]
    mine = participants[(participants >= lo) & (participants < hi)]
    reduction = Reduction(exchange(), NUM_EXAMPLES)
    for chunk in np.array_split(mine[::-1], 2):  # passes in any order: the result is sorted by client
        if len(chunk):
            reduction.add(chunk, uploads(chunk))
    reduced, sent = reduction.finish(comm=comm)
    out = {"sent": sent}
    for name in MEANS:
        out[name] = {"values": {k: v.tolist() for k, v in reduced[name].values.items()},
                     "weights": reduced[name].weights.tolist(), "dtype": str(reduced[name].weights.dtype)}
    for name in GATHERS:
        rows = reduced[name]
        out[name] = {"values": {k: v.tolist() for k, v in rows.values.items()}, "clients": rows.clients.tolist(),
                     "weights": rows.weights.tolist(), "dtype": str(next(iter(rows.values.values())).dtype)}
    return out


if __name__ == "__main__":
    results = {s: MPI.COMM_WORLD.gather(main(MPI.COMM_WORLD, s)) for s in SCENARIOS}
    if MPI.COMM_WORLD.rank == 0:
        print(json.dumps(results))  # every rank's copy: they must all agree

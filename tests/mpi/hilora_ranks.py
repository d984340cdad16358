"""Run by tests/test_hilora.py under mpiexec: HiLoRA's cluster-tier reduction, each rank
contributing its own block of clients (segment_sum by cluster id, then one collective)."""
import json
import sys

import numpy as np
import torch
from mpi4py import MPI

from fedhpc.configtree import build
from fedhpc.runtime.reduce import GroupReduction
from fedhpc.runtime.world import block_range
from fedhpc.strategies import StrategyConfig, build_strategy
from fedhpc.strategies.hilora_tiers import CLUSTER

R = 2
SHAPES = {"m.lora_A": (3 * R, 5), "m.lora_B": (6, 3 * R), "n.lora_A": (3 * R, 4), "n.lora_B": (7, 3 * R),
          "head.weight": (3, 4), "head.bias": (3,)}
NUM_CLIENTS, NUM_CLUSTERS = 11, 3


def clusters() -> np.ndarray:
    return np.arange(NUM_CLIENTS) % NUM_CLUSTERS


def trained(ids: np.ndarray) -> dict[str, torch.Tensor]:
    """Client rows depend on the client id only, never on the rank."""
    g = [torch.Generator().manual_seed(100 + int(c)) for c in ids]
    return {k: torch.stack([torch.randn(*s, generator=gi) for gi in g]) for k, s in SHAPES.items()}


def weights(ids: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(ids % 4 + 1, dtype=torch.float64)


def main(comm, mode: str) -> dict:
    cfg = build(StrategyConfig, {"name": "hilora", "cluster_aggregation": mode})
    strategy = build_strategy(cfg, keys=list(SHAPES), groups=clusters())
    init = {k: torch.randn(1, *s, generator=torch.Generator().manual_seed(0)) for k, s in SHAPES.items()}
    server = strategy.init_server(init)
    tiers = [k for k in server if k.endswith(("cluster_A", "cluster_B"))] + ["head.weight", "head.bias"]
    server.update({k: server[k].expand(NUM_CLUSTERS, *server[k].shape[1:]).clone() for k in tiers})
    server.update(stage=torch.tensor([CLUSTER]), clusters=torch.as_tensor(clusters()))
    exchange = strategy.exchange(server, SHAPES)
    reduction = GroupReduction(exchange.means, exchange.num_groups, exchange.gathered)
    lo, hi = block_range(NUM_CLIENTS, comm.size, comm.rank)
    for chunk in np.array_split(np.arange(lo, hi)[::-1], 2):  # passes in any order
        if len(chunk):
            reduction.add(strategy.contribute(trained(chunk), chunk, weights(chunk), server=server))
    reduced, sent = reduction.finish(comm=comm)
    new = strategy.aggregate(server, reduced, round_index=1)
    products = {m: (new[f"{m}.cluster_B"].double() @ new[f"{m}.cluster_A"].double()).tolist() for m in ("m", "n")}
    return {"products": products, "head": new["head.weight"].tolist(), "sent": sent}


if __name__ == "__main__":
    results = MPI.COMM_WORLD.gather(main(MPI.COMM_WORLD, sys.argv[1]))
    if MPI.COMM_WORLD.rank == 0:
        print(json.dumps(results))

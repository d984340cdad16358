"""Run by tests/test_hilora.py under mpiexec: HiLoRA's cluster-tier reduction, each rank
adding the uploads of its own block of clients (segment_sum by cluster id, then one collective)."""
import json
import sys

import numpy as np
import torch
from mpi4py import MPI

from fedhpc.configtree import build
from fedhpc.models.ranks import ClientRanks
from fedhpc.runtime.reduce import Reduction
from fedhpc.runtime.world import block_range
from fedhpc.strategies import Population, StrategyConfig, build_strategy
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
    """The clients' sample counts: the weight of their uploads."""
    return torch.as_tensor(ids % 4 + 1, dtype=torch.float64)


def main(comm, mode: str) -> dict:
    cfg = build(StrategyConfig, {"name": "hilora", "cluster_aggregation": mode})
    ids = np.arange(NUM_CLIENTS)
    population = Population(num_examples=weights(ids).numpy(), groups=clusters(),
                            ranks=ClientRanks(np.full(NUM_CLIENTS, 3 * R), 6.0))
    strategy = build_strategy(cfg, shapes=SHAPES, population=population)
    init = {k: torch.randn(1, *s, generator=torch.Generator().manual_seed(0)) for k, s in SHAPES.items()}
    server = strategy.init_server(init, frozen={})
    tiers = [k for k in server if k.endswith(("cluster_A", "cluster_B"))] + ["head.weight", "head.bias"]
    server.update({k: server[k].expand(NUM_CLUSTERS, *server[k].shape[1:]).clone() for k in tiers})
    server.update(stage=torch.tensor([CLUSTER]), clusters=torch.as_tensor(clusters()))
    plan = strategy.configure_train(server, ids, ids)
    reduction = Reduction(plan.exchange, population.num_examples)
    lo, hi = block_range(NUM_CLIENTS, comm.size, comm.rank)
    for chunk in np.array_split(np.arange(lo, hi)[::-1], 2):  # passes in any order
        if len(chunk):
            state = {k: v.expand(len(chunk), *v.shape[1:]).clone() for k, v in strategy.init_client(init).items()}
            _, upload = strategy.finish_client(server, trained(chunk), state, chunk)
            reduction.add(chunk, upload)
    reduced, sent = reduction.finish(comm=comm)
    new = strategy.aggregate_train(server, reduced, round_index=1)
    products = {m: (new[f"{m}.cluster_B"].double() @ new[f"{m}.cluster_A"].double()).tolist() for m in ("m", "n")}
    return {"products": products, "head": new["head.weight"].tolist(), "sent": sent}


if __name__ == "__main__":
    results = MPI.COMM_WORLD.gather(main(MPI.COMM_WORLD, sys.argv[1]))
    if MPI.COMM_WORLD.rank == 0:
        print(json.dumps(results))

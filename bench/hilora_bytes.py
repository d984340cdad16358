"""MPI bytes one rank sends per HiLoRA round, by aggregation mode, as its hosted clients grow.

    python bench/hilora_bytes.py [configs/hilora.yaml] [--clusters 4]

Builds the config's model (adapter shapes only, nothing trains), then for each of
`product_dense`, `product_gather`, `factor_mean` and each stage pushes random uploads of
C clients (`finish_client`) through the real `Reduction` on COMM_SELF and prints the bytes it reports (what
this rank puts into the collectives). The tension: product-space aggregation either ships
dense d_out x d_in per group (flat in C) or every client's factors (linear in C).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from mpi4py import MPI

from fedhpc.config import load_config
from fedhpc.assemble import adapter_lora
from fedhpc.models.backbone import build_cohort_model
from fedhpc.models.ranks import ClientRanks
from fedhpc.runtime.reduce import Reduction
from fedhpc.strategies import Population, build_strategy
from fedhpc.strategies.hilora_tiers import CLUSTER, LEAF


def sent_bytes(cfg, model, mode: str, stage: int, clients: int, clusters: int) -> int:
    cfg.strategy.root_aggregation = cfg.strategy.cluster_aggregation = mode
    shapes, lora, ids = model.shapes, adapter_lora(cfg), np.arange(clients)
    population = Population(num_examples=np.ones(clients), groups=ids % clusters,
                            ranks=ClientRanks(np.full(clients, lora.r), lora.lora_alpha), seed=cfg.seed)
    strategy = build_strategy(cfg.strategy, shapes=dict(shapes), population=population)
    init = {k: torch.randn(1, *s) for k, s in shapes.items()}
    server = strategy.init_server(init, frozen=model.frozen_weights())
    server["stage_round"] += 1  # not the clustering round
    if stage != 0:
        for k in [k for k in server if k.endswith(("cluster_A", "cluster_B"))] + strategy.heads:
            server[k] = server[k].expand(clusters, *server[k].shape[1:]).clone()
        server.update(stage=torch.tensor([stage]), clusters=torch.arange(clients) % clusters)
    plan = strategy.configure_train(server, ids, ids)
    reduction = Reduction(plan.exchange, population.num_examples)
    trained = {k: torch.randn(clients, *s) for k, s in shapes.items()}
    state = {k: v.expand(clients, *v.shape[1:]).clone() for k, v in strategy.init_client(init).items()}
    _, upload = strategy.finish_client(server, trained, state, ids)
    reduction.add(ids, upload)
    return reduction.finish(comm=MPI.COMM_SELF)[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?", default="configs/hilora.yaml")
    parser.add_argument("--clusters", type=int, default=4)
    args = parser.parse_args()
    cfg = load_config(args.config)
    model = build_cohort_model(cfg.model, adapter_lora(cfg), num_classes=cfg.data.planted.num_classes, seed=0)
    shapes = model.shapes
    r = cfg.lora.r
    adapter = sum(r * (s[1] + shapes[k.replace("lora_A", "lora_B")][0]) for k, s in shapes.items()
                  if k.endswith("lora_A")) * 4
    print(f"model {cfg.model.name} {cfg.model.kwargs}; one tier's factors: {adapter:,} B (float32); "
          f"K = {args.clusters} clusters")
    print("| mode | stage | clients on the rank | MPI bytes sent by the rank |")
    print("|---|---|---|---|")
    for mode in ("product_dense", "product_gather", "factor_mean"):
        for stage, name in ((0, "root"), (CLUSTER, "cluster"), (LEAF, "leaf")):
            for clients in (5, 20, 80):
                print(f"| {mode} | {name} | {clients} | "
                      f"{sent_bytes(cfg, model, mode, stage, clients, args.clusters):,} |")


if __name__ == "__main__":
    main()

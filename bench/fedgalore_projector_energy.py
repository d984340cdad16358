"""How much of each client's gradient energy FedGaLore's S1 shared projector captures, against the
client's own top-r projector: ‖R‖² / ‖G‖² on every client's first batch of round 11, after 10 rounds
of S1 on configs/fedgalore.yaml (tuning seed 100, label skew 0.1, lr 0.003; ~12 s of CPU).

    OMP_NUM_THREADS=1 python bench/fedgalore_projector_energy.py
"""
from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI

from fedhpc.assemble import assemble
from fedhpc.clients import train_pass
from fedhpc.config import load_config
from fedhpc.experiment import run
from fedhpc.io.checkpoint import load
from fedhpc.models.cohort import client_delta_key
from fedhpc.strategies.galore import project, top_singular
from fedhpc.train.plan import Task

OUT = "runs/fedgalore_energy"


def main() -> None:
    cfg = load_config("configs/fedgalore.yaml", [
        "strategy.name=fedgalore", "strategy.sync=s1", "seed=100", "train.optimizer.lr=0.003", "rounds=10",
        "checkpoint.every=10", "eval.every=10", f"out_dir={OUT}", "name=s1"])
    run(cfg, comm=MPI.COMM_SELF, progress=False)
    r = assemble(cfg, MPI.COMM_SELF)
    server = load(f"{OUT}/s1/checkpoints/round-000010.h5", clients=r.world.clients, device=r.world.device).server
    clients, sides, rank = np.arange(cfg.num_clients), r.strategy.sides, r.strategy.r
    plan = r.strategy.configure_client(server, {}, clients, Task.TRAIN)  # round 11: the shared projector
    shared = {s.module: server[f"{s.module}.P_shared"].expand(len(clients), -1, -1) for s in sides}
    rows = []

    def probes(step):  # the full-space gradient of step 0, which S1 itself never needs
        return {client_delta_key(s.module): torch.zeros(len(clients), s.d_out, s.d_in) for s in sides} if step == 0 else {}

    def probed(grads, adapters):
        for s in sides:
            G = grads[client_delta_key(s.module)]
            total = G.square().sum((1, 2))
            own = project(G, top_singular(G, rank, right=s.right), right=s.right).square().sum((1, 2)) / total
            common = project(G, shared[s.module], right=s.right).square().sum((1, 2)) / total
            rows.append((s.module, own.mean().item(), common.mean().item()))

    plan.hooks.probes, plan.hooks.probed, plan.steps = probes, probed, 1
    train_pass(r, plan, clients, task=Task.TRAIN, round_index=11)
    print(f"| module | own top-{rank} projector | S1 shared projector |\n|---|---:|---:|")
    for module, own, common in rows:
        print(f"| {module} | {own:.3f} | {common:.3f} |")


if __name__ == "__main__":
    main()

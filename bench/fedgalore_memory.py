"""Per-client memory of FedGaLore's local training against FedIT and full fine-tuning, counted from
the tensors each method's client plan actually holds, and the bytes of one round on the wire.

    OMP_NUM_THREADS=1 python bench/fedgalore_memory.py [configs/fedgalore.yaml] [dotted overrides ...]
    # a ViT-B-sized backbone (the labels do not matter here: the latent teacher skips labelling)
    OMP_NUM_THREADS=1 python bench/fedgalore_memory.py configs/fedgalore.yaml lora.r=8 \
        "model.kwargs={img_size: 32, patch_size: 8, depth: 12, embed_dim: 768, num_heads: 12}" \
        data.planted.teacher=latent data.planted.root_rank=0 data.planted.label_skew=0

Per client, in float32 bytes: the trained tensors, fixed per-client tensors (FedGaLore's projector),
the optimizer state (Adam's two moments; FedGaLore's live in projected coordinates), and the peak of
the gradients (FedGaLore adds the dense full-space gradient at a projector refresh). The frozen
backbone, the shared folded update and activations are the same for every method and left out.
Bytes up / down are one participant's modelled bytes in a round after the first (FedGaLore's down
link carries the previous round's update and its synchronised state).
"""
from __future__ import annotations

import sys

import numpy as np
import torch
from mpi4py import MPI

from fedhpc.assemble import assemble
from fedhpc.config import load_config
from fedhpc.runtime.exchange import modelled_bytes
from fedhpc.train.optim import StackedOptimizer
from fedhpc.train.plan import Task

METHODS = {"fedgalore (s2)": ["strategy.name=fedgalore"], "fedgalore (s1)": ["strategy.name=fedgalore", "strategy.sync=s1"],
           "fedit": ["strategy.name=fedit"], "fedavg_full": ["strategy.name=fedavg_full"]}


def _per_client(tensors: dict[str, torch.Tensor], count: int) -> int:
    return sum(v[0].numel() * v.element_size() for v in tensors.values() if v.dim() and v.shape[0] == count)


def measure(config: str, overrides: list[str]) -> dict[str, float]:
    run = assemble(load_config(config, overrides + ["out_dir=/nonexistent"]), MPI.COMM_SELF)
    s = run.strategy
    server = s.init_server(run.init, frozen=run.model.frozen_weights())
    clients = np.array([0, 1])
    plan = s.configure_client(server, s.init_client(run.init), clients, Task.TRAIN)
    trained = {k: plan.start[k] for k in plan.trainable}
    fixed = {k: v for k, v in plan.start.items() if k not in plan.trainable}
    state = plan.opt_state or StackedOptimizer(run.cfg.train.optimizer).init_state(trained)
    state = {k: v for k, v in state.items() if k != "step"}
    probe = _per_client(plan.hooks.probes(0), 2)  # FedGaLore's dense gradient at a refresh step
    row = {"trained": _per_client(trained, 2), "fixed": _per_client(fixed, 2), "optimizer": _per_client(state, 2)}
    row["gradients (peak)"] = row["trained"] + probe
    # bytes of a later round: the server state after one aggregation of the plan's shapes
    participants = run.data.seen
    exchange = s.configure_train(_after_one_round(s, server, participants), participants, participants).exchange
    up, down = modelled_bytes(exchange, participants, run.ranks.ranks, run.data.num_examples)
    row.update(up=up / len(participants), down=down / len(participants))
    return row


def _after_one_round(strategy, server, participants):
    """The server state's shape-relevant counters after a round (FedGaLore: last stack, shared projector)."""
    new = dict(server)
    if "galore.stack" in server:
        new["galore.stack"] = torch.full_like(server["galore.stack"], float(len(participants) * strategy.q))
        new["galore.shared"] = torch.ones_like(server["galore.shared"])
    return new


def main() -> None:
    config = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].count("=") else "configs/fedgalore.yaml"
    extra = [a for a in sys.argv[1:] if "=" in a]
    rows = {name: measure(config, overrides + extra) for name, overrides in METHODS.items()}
    cols = ["trained", "fixed", "optimizer", "gradients (peak)", "up", "down"]
    print("| method | " + " | ".join(f"{c} (kB)" for c in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[c] / 1e3:.1f}" for c in cols) + " |")


if __name__ == "__main__":
    main()

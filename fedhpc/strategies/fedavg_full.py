"""Full fine-tuning FedAvg of the adapted matrices: the upper reference of the federated-LoRA methods.

Spec: algorithms.md §2.14 (FedGaLore's framing: "LoRA can substantially underperform full-parameter
fine-tuning under non-IID", §7.1). Every adapted weight W (the LoRA target modules) and the head train
in full on each client; the server averages the dense updates:

    client k:  ΔW_k trained from 0 with the run's AdamW (the `<module>.client_delta` variant of the
               cohort layer: y += x ΔW_kᵀ, a dense [d_out, d_in] per client)
    server:    W <- W + Σ_k p_k ΔW_k   (the shared `<module>.base_delta`),  head <- Σ_k p_k head_k

The dense per-client key (rather than the factored variant at full rank with an identity factor)
costs one batched matmul per layer instead of two and holds exactly the d_out x d_in entries each
client trains. Up and down: d_out d_in per module per client. Weight decay (if configured) acts on
ΔW_k, i.e. toward the round's start, not toward zero weights.

The run refuses to start, in one line, when the dense per-client state of even the smallest pass
(two clients) cannot fit the machine: (4 + 8) Σ d_out d_in bytes for the server's delta and its
float64 reduction, plus 16 Σ d_out d_in per client in a pass (ΔW, its gradient, two Adam moments).
Activations and the frozen backbone come on top; `train.clients_per_pass` multiplies the per-client part.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..models.cohort import base_delta_key, client_delta_key
from .base import Block, ClientPlan, Exchange, RoundPlan, Strategy, StrategyConfig, Task, is_head, register_strategy
from .factors import lora_modules

__all__ = ["FedAvgFullConfig", "FedAvgFull", "estimated_bytes", "machine_bytes"]

SERVER_BYTES, CLIENT_BYTES = 12, 16  # per dense entry: delta + float64 sum; ΔW + grad + Adam m, v


@dataclass(kw_only=True)
class FedAvgFullConfig(StrategyConfig):
    memory_limit_gb: float = 0.0
    """Memory the run may use, in GB (0: the machine's: physical memory, or the GPU's)."""

    def __post_init__(self):
        if self.keep_optimizer_state:
            raise ValueError("strategy.keep_optimizer_state must be false for fedavg_full: every round trains a "
                             "fresh dense update from the new global weights")
        if self.memory_limit_gb < 0:
            raise ValueError(f"strategy.memory_limit_gb must be >= 0, got {self.memory_limit_gb}")


def estimated_bytes(dense_entries: int, clients_per_pass: int) -> int:
    """Bytes of fedavg_full's dense state on a rank: the shared delta and its reduction, plus a pass."""
    return (SERVER_BYTES + CLIENT_BYTES * clients_per_pass) * dense_entries


def machine_bytes(device: torch.device) -> int:
    """Memory of the device's machine: the GPU's total, or the host's physical memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@register_strategy("fedavg_full")
class FedAvgFull(Strategy):
    Config = FedAvgFullConfig

    def __init__(self, cfg, *, shapes, population):
        super().__init__(cfg, shapes=shapes, population=population)
        self.modules = lora_modules(self.keys)
        self.dense = {client_delta_key(m): (shapes[f"{m}.lora_B"][0], shapes[f"{m}.lora_A"][1]) for m in self.modules}
        self.head = [k for k in self.keys if is_head(k)]

    def init_server(self, init, *, frozen):
        device = init["head.weight"].device
        entries = sum(d_out * d_in for d_out, d_in in self.dense.values())
        need = estimated_bytes(entries, clients_per_pass=2)
        have = self.cfg.memory_limit_gb * 1e9 or machine_bytes(device)
        if need > have:
            raise ValueError(f"strategy fedavg_full needs at least {need / 1e6:.1f} MB for its dense updates "
                             f"({entries} entries, 2 clients per pass), more than the {have / 1e6:.1f} MB of "
                             f"this {device.type} machine (strategy.memory_limit_gb); fine-tune fewer modules "
                             "(lora.target_modules)")
        server = {k: init[k].clone() for k in self.head}
        for m, (d_out, d_in) in zip(self.modules, self.dense.values()):
            server[base_delta_key(m)] = torch.zeros(1, d_out, d_in, device=device)
        return server

    def configure_train(self, server, sampled, seen):
        up = {**self.dense, **{k: self.shapes[k] for k in self.head}}
        return RoundPlan(sampled, Exchange({"dense": Block(up)}, down=up))

    def configure_client(self, server, state, clients, task):
        if task == Task.PROBE:
            return None
        start = self.configure_evaluate(server, state, clients)
        dev = server["head.weight"].device
        start.update({k: torch.zeros(len(clients), *shape, device=dev) for k, shape in self.dense.items()})
        return ClientPlan(start, list(self.dense) + self.head)

    def aggregate_train(self, server, reduced, *, round_index):
        block = reduced["dense"]
        if float(block.weights[0]) == 0:
            return dict(server)
        new = dict(server)
        new.update({k: block.values[k].to(server[k]) for k in self.head})
        for m in self.modules:
            key = base_delta_key(m)
            new[key] = server[key] + block.values[client_delta_key(m)].to(server[key])
        return new

    def configure_evaluate(self, server, state, clients):
        out = {k: server[k].expand(len(clients), *server[k].shape[1:]).clone() for k in self.head}
        out.update({base_delta_key(m): server[base_delta_key(m)] for m in self.modules})
        return out

    def global_model(self, server, init):
        out = {k: server[k][:1] for k in self.head}
        out.update({base_delta_key(m): server[base_delta_key(m)] for m in self.modules})
        return out

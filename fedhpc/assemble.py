"""Everything a run reads, built once from the config: world, data, model, strategy, initial adapters.

Shared by the round loop (`experiment.py`), export (`io/export.py`) and the tools that rebuild a
run's model from its config, so they all build exactly the same thing.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .config import ExperimentConfig
from .data import build_federated_data
from .data.proxy import hold_out_proxy
from .models.backbone import build_cohort_model
from .models.ranks import ClientRanks
from .models.teacher import plant_backbone_teacher
from .runtime.world import World, make_world
from .single_thread import single_threaded
from .strategies import Population, Strategy, build_strategy
from .train.local import probe_clients_per_pass

__all__ = ["Run", "assemble", "adapter_lora"]


@dataclass
class Run:
    """What the loop reads, built once."""
    cfg: ExperimentConfig
    world: World
    data: object
    model: object
    strategy: Strategy
    init: dict
    """Shared initial adapters `[1, ...]` on the run's device."""
    per_pass: int
    """Clients fused into one forward pass."""
    ranks: ClientRanks
    proxy: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """Sorted indices into the training pool of the server's proxy set (empty unless the strategy
    asks for one: `StrategyConfig.proxy_samples`); no client trains on them."""

    def scaling(self, ids) -> torch.Tensor:
        """`[C]` LoRA scaling of these clients on the run's device."""
        return self.ranks.scaling(ids).to(self.world.device)


def assemble(cfg: ExperimentConfig, comm) -> Run:
    world = make_world(comm, num_clients=cfg.num_clients, device=cfg.device)
    modality = "text" if cfg.model.family == "hf" else "image"
    # Planted data with a latent teacher is built per rank: each rank draws only its own clients'
    # samples (the same bits per client at any rank count). The backbone teacher relabels every
    # client's samples and a proxy set takes samples from all clients, so those build everything.
    per_rank = (cfg.data.name == "planted" and cfg.data.planted.teacher == "latent"
                and cfg.strategy.proxy_samples() == 0)
    data = build_federated_data(cfg.data, num_clients=cfg.num_clients, seed=cfg.seed, modality=modality,
                                seq_len=cfg.model.seq_len, tokenizer=cfg.model.name if modality == "text" else "",
                                hosted=world.clients if per_rank else None)
    lora = adapter_lora(cfg)
    ranks = ClientRanks(lora.client_ranks(cfg.num_clients, seed=cfg.seed), lora.lora_alpha)
    model = build_cohort_model(cfg.model, lora, num_classes=data.num_classes, seed=cfg.seed, device=world.device,
                               rank=ranks.max)
    if cfg.data.name == "planted" and cfg.data.planted.teacher == "backbone":
        with single_threaded():  # labels must not depend on the thread count either
            data = plant_backbone_teacher(model, data, cfg=cfg.data.planted, seed=cfg.seed)
    proxy = np.zeros(0, dtype=np.int64)
    if cfg.strategy.proxy_samples() > 0:  # after labelling: the proxy set keeps its samples' labels
        data, proxy = hold_out_proxy(data, count=cfg.strategy.proxy_samples(), seed=cfg.seed)
    population = Population(num_examples=data.num_examples, groups=data.groups, ranks=ranks, seed=cfg.seed,
                            layer_groups=data.layer_groups)
    strategy = build_strategy(cfg.strategy, shapes=dict(model.shapes), population=population)
    init = {k: v.to(world.device) for k, v in model.init_adapters(1, torch.Generator().manual_seed(cfg.seed)).items()}
    per_pass = cfg.train.clients_per_pass
    if per_pass == 0:
        # Timing decides only how many clients share a pass; any choice >= 2 gives the same
        # numbers, so the probe cannot change results. Rank 0 decides for everyone.
        choice = None
        if world.is_root:
            choice = probe_clients_per_pass(model, sample=data.train_x[0].to(world.device),
                                            batch_size=cfg.train.batch_size, max_clients=max(2, len(world.clients)),
                                            trainable=list(model.shapes), precision=cfg.train.precision)
        per_pass = comm.bcast(choice, root=0)
    return Run(cfg, world, data, model, strategy, init, per_pass, ranks, proxy)


def adapter_lora(cfg: ExperimentConfig):
    """The LoRA config the model is built with: the strategy's adapter rank (HiLoRA stacks three
    rank-r tiers into 3r), alpha scaled along so that each rank-r part keeps scaling alpha / r."""
    rank = cfg.strategy.adapter_rank(cfg.lora.r)
    if rank == cfg.lora.r:
        return cfg.lora
    if cfg.lora.ranks or cfg.lora.client_tiers or cfg.lora.rank_choices:
        raise ValueError(f"strategy {cfg.strategy.name} gives every client one rank (lora.r); "
                         "remove lora.ranks / lora.client_tiers / lora.rank_choices")
    return replace(cfg.lora, r=rank, lora_alpha=cfg.lora.lora_alpha * rank / cfg.lora.r)

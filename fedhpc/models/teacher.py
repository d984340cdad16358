"""The planted backbone teacher: the frozen backbone itself, with planted low-rank adapters.

Client k's labels come from the student's own frozen backbone carrying a LoRA update on every
target layer and a head, each a sum of three planted low-rank parts:

    ΔW_k = ΔW_root + ΔW_{c(k)} + ΔW_k ,   head_k = H_root + H_{c(k)} + H_k ,   y = argmax head_k(f_k(x))

so the federated student (same backbone, LoRA on the same layers, a trainable head) can fit
every client exactly in principle, and clients of one cluster share a LoRA subspace that
clustering methods must recover. Each part has norm `strength * ||W0||_F`; the parts' seeds
depend only on (seed, tier, id), never on the rank count. The global test set is labelled by
the root teacher (root parts only).

FedGaLore's setting (algorithms.md §7): `root_rank` plants a full-rank root part, and `label_skew`
deals the labelled samples over the clients by Dirichlet(α) label shares.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from ..data.config import PlantedConfig
from ..data.federated import FederatedData
from ..data.partition import dirichlet_partition, ensure_min_samples, matched_test_partition
from ..rng import make_rng
from .cohort import CohortModel, group_by_block

__all__ = ["plant_backbone_teacher"]

ROOT_STRENGTH = 0.5
"""Norm of the root part relative to the frozen weight: the shared task moves away from W0."""
LABEL_CHUNK = 64
"""Rows per client per labelling pass."""
LABEL_SKEW_MIN_SAMPLES = 2
"""Training samples every client keeps under `label_skew`."""


def _part(seed: int, tier: int, ident: int, shape: tuple[int, int], rank: int, norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A random rank-`rank` pair (B [d_out, p], A [p, d_in]) with ||B A||_F = norm."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, tier, ident]).generate_state(1)[0]))
    b = torch.randn(shape[0], rank, generator=g, dtype=torch.float64)
    a = torch.randn(rank, shape[1], generator=g, dtype=torch.float64)
    return b * (norm / torch.linalg.matrix_norm(b @ a)), a


def _teacher_adapters(model: CohortModel, clusters: np.ndarray, clients: np.ndarray, cfg: PlantedConfig,
                      seed: int, *, root_only: bool) -> dict[str, torch.Tensor]:
    """Stacked teacher adapters `[C, ...]` for these clients (rank 3p: root | cluster | client)."""
    frozen = {n: model.backbone.get_submodule(n).base.weight.detach().double() for n in model.targets}
    frozen["head"] = model.head_init["head.weight"].double()
    p = cfg.perturbation_rank
    levels = _depth_levels(model.targets, cfg)
    silent = _silent_targets(model.targets, cfg)
    out = {}
    for t, (name, w0) in enumerate(frozen.items()):
        scale = torch.linalg.matrix_norm(w0).item()
        strengths = (ROOT_STRENGTH, 0.0 if root_only else cfg.cluster_strength, 0.0 if root_only else cfg.client_strength)
        root_rank = min(cfg.root_rank, *w0.shape)  # 0: perturbation_rank
        if name in silent:  # teacher_blocks: no planted part outside the chosen blocks
            strengths = (0.0, 0.0, 0.0)
        bs, as_ = [], []
        for k in clients:
            parts = [_part(seed, 3 * t, 0, w0.shape, root_rank or p, strengths[0] * scale),
                     _part(seed, 3 * t + 1, int(clusters[k]), w0.shape, p, strengths[1] * scale),
                     _part(seed, 3 * t + 2, int(k), w0.shape, p, strengths[2] * scale)]
            if name in levels:  # depth profile: the block's own grouping replaces cluster + client parts
                norm = (strengths[2] if levels[name] == 0 else strengths[1]) * scale
                parts[1:] = _depth_parts(seed, t, levels[name], int(k), clusters, cfg, w0.shape, norm)
            bs.append(torch.cat([b for b, _ in parts], dim=1))
            as_.append(torch.cat([a for _, a in parts], dim=0))
        b, a = torch.stack(bs).float(), torch.stack(as_).float()
        if name == "head":
            out["head.weight"] = model.head_init["head.weight"] + b @ a
            out["head.bias"] = torch.zeros(len(clients), b.shape[1])
        else:
            out[f"{name}.lora_A"], out[f"{name}.lora_B"] = a, b
    return out


def _silent_targets(targets: list[str], cfg: PlantedConfig) -> set[str]:
    """Target modules outside the blocks `cfg.teacher_blocks`, and the head: they carry no planted
    part, so the teacher's LoRA lives in those blocks only. Empty without `teacher_blocks`."""
    if not cfg.teacher_blocks:
        return set()
    blocks = group_by_block(targets)
    if max(cfg.teacher_blocks) >= len(blocks):
        raise ValueError(f"data.planted.teacher_blocks={cfg.teacher_blocks} names a block past the model's "
                         f"{len(blocks)} blocks with target modules (0-based, shallow to deep)")
    return {"head"} | {name for i, names in enumerate(blocks) if i not in cfg.teacher_blocks for name in names}


def _depth_levels(targets: list[str], cfg: PlantedConfig) -> dict[str, int]:
    """Each target module's entry of `cfg.depth_profile` (by its block); empty without a profile."""
    if not cfg.depth_profile:
        return {}
    blocks = group_by_block(targets)
    if len(blocks) != len(cfg.depth_profile):
        raise ValueError(f"data.planted.depth_profile has {len(cfg.depth_profile)} entries but the model has "
                         f"{len(blocks)} blocks with target modules; give one entry per block")
    return {name: level for names, level in zip(blocks, cfg.depth_profile) for name in names}


def _depth_parts(seed: int, t: int, level: int, k: int, clusters: np.ndarray, cfg: PlantedConfig,
                 shape: tuple[int, int], norm: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Client k's non-root parts at target t of a depth-profile block: the part of its group at
    this level (its own part at a per-client block; norm 0 at a shared one), then a zero part, so
    every target keeps rank 3p."""
    p = cfg.perturbation_rank
    if level == 0:
        varied = _part(seed, 3 * t + 2, k, shape, p, norm)
    else:
        group = int(_depth_groups(level, clusters, cfg.num_clusters)[k])
        varied = _part(seed, 3 * t + 1, level * len(clusters) + group, shape, p, norm if level > 1 else 0.0)
    return [varied, _part(seed, 3 * t + 2, k, shape, p, 0.0)]


def _depth_groups(level: int, clusters: np.ndarray, num_clusters: int) -> np.ndarray:
    """`[num_clients]` group of every client at a block of this depth-profile level."""
    if level == 0:
        return np.arange(len(clusters))
    return np.asarray(clusters) // (num_clusters // level)


@torch.no_grad()
def _label(model: CohortModel, adapters: dict[str, torch.Tensor], x: torch.Tensor, rows: list[np.ndarray]) -> list[np.ndarray]:
    """Balanced argmax labels of each client's rows under its teacher adapters."""
    count = len(rows)
    device = next(model.backbone.parameters()).device
    adapters = {k: v.to(device) for k, v in adapters.items()}
    ones = torch.ones(count, device=device)
    logits = [[] for _ in range(count)]
    longest = max(len(r) for r in rows)
    for start in range(0, longest, LABEL_CHUNK):
        index = np.stack([np.resize(r[start:start + LABEL_CHUNK] if len(r[start:]) else r[:1], LABEL_CHUNK) for r in rows])
        out = model(x[torch.from_numpy(index.reshape(-1))].to(device), adapters, scaling=ones)
        out = out.view(count, LABEL_CHUNK, -1).double().cpu()
        for c, r in enumerate(rows):
            logits[c].append(out[c, :max(0, min(LABEL_CHUNK, len(r) - start))])
    labels = []
    for chunks in logits:
        z = torch.cat(chunks)
        z = (z - z.mean(0)) / z.std(0).clamp(min=1e-12)  # per-class centring balances the classes
        labels.append(z.argmax(1).numpy())
    return labels


def _label_skewed(data: FederatedData, labels: torch.Tensor, *, alpha: float, seed: int) -> FederatedData:
    """Clients dealt again by label: Dirichlet(`alpha`) shares of every class of the pooled training
    samples, local test splits following each client's training mix (`data.partition` rules)."""
    train_y, test_y = labels[:len(data.train_y)].numpy(), labels[len(data.train_y):].numpy()
    rng = make_rng(seed, "planted-label-skew")
    parts = dirichlet_partition(train_y, num_clients=data.num_clients, alpha=alpha, rng=rng)
    parts = ensure_min_samples(parts, min_samples=LABEL_SKEW_MIN_SAMPLES, rng=rng)
    tests = matched_test_partition(train_y, parts, test_y, rng=rng)
    return replace(data, client_train=parts, client_test=tests)


def plant_backbone_teacher(model: CohortModel, data: FederatedData, *, cfg: PlantedConfig, seed: int) -> FederatedData:
    """`data` relabelled by the backbone teacher (inputs and clusters unchanged; the clients' samples
    too, unless `label_skew` deals them again by label)."""
    clients = np.arange(data.num_clients)
    teacher = _teacher_adapters(model, data.groups, clients, cfg, seed, root_only=False)
    rows = [np.concatenate([tr, te + len(data.train_y)]) for tr, te in zip(data.client_train, data.client_test)]
    pool = torch.cat([data.train_x, data.test_x])
    labels = np.full(len(pool), -1, dtype=np.int64)
    for start in range(0, len(clients), 16):
        part = slice(start, start + 16)
        for r, lab in zip(rows[part], _label(model, {k: v[part] for k, v in teacher.items()}, pool, rows[part])):
            labels[r] = lab
    root = _teacher_adapters(model, data.groups, clients[:1], cfg, seed, root_only=True)
    (global_labels,) = _label(model, root, data.global_test_x, [np.arange(len(data.global_test_y))])
    labels = torch.from_numpy(labels)
    if cfg.label_skew > 0:
        data = _label_skewed(data, labels, alpha=cfg.label_skew, seed=seed)
    layer_groups = None
    if cfg.depth_profile:
        layer_groups = np.stack([_depth_groups(level, data.groups, cfg.num_clusters) for level in cfg.depth_profile])
    return replace(data, train_y=labels[:len(data.train_y)], test_y=labels[len(data.train_y):],
                   global_test_y=torch.from_numpy(global_labels), layer_groups=layer_groups)

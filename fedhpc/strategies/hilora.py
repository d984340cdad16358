"""HiLoRA: root / cluster / leaf LoRA tiers trained in cascade, clusters found in LoRA subspace.

Paper: Peng et al., "HiLoRA: Hierarchical Low-Rank Adaptation for Personalized Federated
Learning", CVPR 2026, arXiv 2603.02785. Spec: algorithms.md §3; every step marked
[reconstructed] there is an option here. Client i's model on each adapted matrix is

    W0 + s B_r A_r + s B_{c,j(i)} A_{c,j(i)} + s B_{l,i} A_{l,i}      (root, its cluster, its leaf)

The tiers are stacked along the LoRA rank, A = [A_r; A_c; A_l], B = [B_r, B_c, B_l] (the model
is built with rank 3r and scaling alpha / r), so one batched matmul computes all three and the
merged peft export is their sum. One tier trains at a time (the others' gradients are masked):

  root     <= root_rounds, or until rho = ||s B'A' - s BA||_F / ||s BA||_F <= root_tau (the round
           after it fires is the last): ΔW = Σ_i p_i B_i A_i over all participants, rank-r
           truncated SVD, B_r = U, A_r = Σ Vᵀ. Each client keeps an EMA statistic of its root
           rounds (`basis_source`: its normalised trained B [PN], or its change of B or of B A);
           the last root round gathers it once and LSAC (subspace_clustering.py) assigns clusters.
  cluster  cluster_rounds: the same rule inside each cluster; loss + γ_c ||B_rᵀ B||_F².
  leaf     the rounds left: private, never communicated; loss + γ_c ||B_rᵀ B||² + γ_l ||B_cᵀ B||².

The head follows the active tier: averaged over everyone, then inside the cluster, then private.
A new client trains a short probe in the cluster slot on top of the root, is routed to the cluster
whose basis is closest, is evaluated zero-leaf, then fine-tunes a leaf.

A seen client that did not return from the clustering round (`faults.dropout`) has no cluster: it
is routed by its own EMA statistic to the closest cluster centre (the member mean of the
statistic, kept by the server from the clustering round), by the clustering's similarity (one
that never returned in the root stage has a zero statistic and gets the largest cluster). Its
first return in the cluster stage is its join round: it trains in that cluster, uploads its
statistic (gathered), and the server routes it the same way and counts it from the next round
on (its update of the join round is not averaged: its cluster was unknown when the round was
planned). Until then, and in the leaf stage, it is routed the same way wherever its cluster is
needed (at evaluation, a zero statistic is routed like a new client, by its cluster slot).

How a tier's ΔW reaches every rank (`*_aggregation`): `product_dense` reduces the dense
B_i A_i per group (bytes: groups x d_out d_in, independent of the clients); `product_gather`
gathers every participant's factors and runs `lowrank_aggregate` (bytes grow with the
participants); `factor_mean` averages A and B per group (groups x adapter bytes, but
B̄Ā != mean of B_i A_i). See docs/results.md for the measured bytes of each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..runtime.exchange import Rows
from .base import (Block, ClientPlan, Exchange, RoundPlan, Strategy, StrategyConfig, Task, is_head, is_lora_a,
                   kept_init, register_strategy)
from ..kernels import lowrank_aggregate
from .hilora_tiers import (CLUSTER, LEAF, ROOT, STAGES, Aggregation, TierHooks, aggregate_tier, relative_change,
                           tier_slice, tier_tensors)
from .subspace_clustering import (Similarity, Source, Statistic, client_statistic, cluster_clients,
                                  cluster_clients_scalable, route)

TIER, GATHERED = "tier", "gathered"  # block names: the active tier and head per group; rows gathered whole
JOIN = "join"  # block name: the statistics of clients without a cluster, gathered in their join round


@dataclass(kw_only=True)
class HiLoRAConfig(StrategyConfig):
    root_rounds: int = 15
    """Most rounds of the root stage (15 of 50 [3P])."""
    cluster_rounds: int = 20
    """Rounds of the cluster stage (20 of 50 [3P]); the leaf stage takes the rounds left."""
    root_tau: float = 0.01
    """Relative change of the root model that ends the root stage early [reconstructed]."""
    ema_decay: float = 0.9
    """λ of the EMA of each client's normalised root B [3P]."""
    basis_source: Source = "trained_B"
    """What the EMA smooths: the client's trained root B [PN], its change in the round (trained
    minus received B), or the change of its product B A [reconstructed, both: the received root
    is shared by all clients, so only the change carries the client's own direction]."""
    similarity: Similarity = "subspace"
    """How two clients' statistics are compared: principal angles of their column spaces [PN],
    or the signed cosine of the statistics (of the products for `update_product`) [reconstructed]."""
    k_min: int = 2
    """Fewest clusters the eigengap may choose [3P]."""
    k_max: int = 10
    """Most clusters the eigengap may choose [3P] (also capped at seen clients - 1)."""
    sigma: float = 0.0
    """Gaussian kernel width on subspace distances; 0: `sigma_scale` x their off-diagonal median [3P]."""
    sigma_scale: float = 1.0
    """Multiplies the median when `sigma` is 0 (1: the median itself [3P]; below 1 sharpens)."""
    affinity_neighbors: int = 0
    """k > 0: keep affinities only on the symmetric k-nearest-neighbour graph; 0: the dense
    kernel [3P]. See subspace_clustering.gaussian_affinity and docs/results.md (HiLoRA)."""
    clustering_seed: int = 0
    """random_state of scikit-learn's SpectralClustering."""
    clustering: Literal["auto", "exact", "scalable"] = "auto"
    """exact: every pair of clients on every matrix (N² Grams; minutes at 10³ clients, a day at
    10⁴); scalable: statistics projected to `scalable_width` rows, a `scalable_neighbors`-NN graph
    found through a small sketch, sparse spectral clustering (subspace_clustering.py; under a minute
    at 10⁴, see docs/results.md "Scale"); auto: exact up to `scalable_above` clustered clients."""
    scalable_above: int = 500
    """auto picks the scalable path above this many clustered clients."""
    scalable_neighbors: int = 30
    """k of the scalable path's k-NN graph (affinity_neighbors, when > 0, wins)."""
    scalable_width: int = 64
    """Rows each statistic is projected to on the scalable path (on the principal directions of a
    sample of the clients' statistics: subspace_clustering.principal_bases)."""
    gamma_cluster: float = 0.1
    """γ_c: weight of ||B_rᵀ B||_F² while training the cluster and leaf tiers [3P]."""
    gamma_leaf: float = 0.1
    """γ_l: weight of ||B_cᵀ B||_F² while training the leaf tier [3P]."""
    root_aggregation: Aggregation = "product_dense"
    """How the root ΔW is reduced over ranks (module docstring) [PN: product space + SVD]."""
    cluster_aggregation: Aggregation = "product_dense"
    """How each cluster's ΔW is reduced [reconstructed: same rule as the root]."""
    leaf_lr_scale: float = 1.0
    """Learning rate of the leaf stage relative to train.optimizer.lr [reconstructed: the leaf
    fine-tunes on one client's data alone, where a full step overfits]."""
    leaf_trains_head: bool = True
    """Whether the leaf stage also trains the client's (then private) head, or only the leaf
    LoRA on top of the cluster's head [reconstructed: the notes' leaf objective names only B, A]."""
    probe_steps: int = 20
    """Local steps of an unseen client's probe before routing [reconstructed]."""

    def adapter_rank(self, r: int) -> int:
        return 3 * r

    def __post_init__(self):
        if self.root_rounds < 1 or self.cluster_rounds < 0 or self.probe_steps < 1:
            raise ValueError("root_rounds and probe_steps must be >= 1 and cluster_rounds >= 0, got "
                             f"{self.root_rounds}, {self.probe_steps}, {self.cluster_rounds}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.sigma_scale <= 0 or self.leaf_lr_scale <= 0:
            raise ValueError(f"sigma_scale and leaf_lr_scale must be > 0, got {self.sigma_scale}, {self.leaf_lr_scale}")
        if not 1 <= self.k_min <= self.k_max:
            raise ValueError(f"need 1 <= k_min <= k_max, got {self.k_min}, {self.k_max}")
        if min(self.gamma_cluster, self.gamma_leaf, self.root_tau, self.affinity_neighbors, self.sigma,
               self.clustering_seed) < 0:
            raise ValueError("gamma_cluster, gamma_leaf, root_tau, affinity_neighbors, sigma and clustering_seed "
                             "must be >= 0")
        if self.clustering not in ("auto", "exact", "scalable"):
            raise ValueError(f"clustering must be auto, exact or scalable, got {self.clustering!r}")
        if min(self.scalable_above, self.scalable_neighbors, self.scalable_width) < 1:
            raise ValueError("scalable_above, scalable_neighbors and scalable_width must be >= 1")
        if self.keep_optimizer_state:
            raise ValueError("keep_optimizer_state must be false: a frozen tier's optimizer moments would move it")


@register_strategy("hilora")
class HiLoRA(Strategy):
    Config = HiLoRAConfig

    def __init__(self, cfg, *, shapes, population):
        super().__init__(cfg, shapes=shapes, population=population)
        self.modules = [k[:-len(".lora_A")] for k in self.keys if is_lora_a(k)]
        self.heads = [k for k in self.keys if is_head(k)]
        self.groups = population.groups

    # --- state -----------------------------------------------------------------------------
    def init_client(self, init):
        """The whole stack (the server's tiers overwrite root and cluster on receipt), the EMA
        clustering statistic, and whether the client's leaf stage has begun."""
        r = self._rank(init)
        product = self.cfg.basis_source == "update_product"
        state = kept_init(init, self.keys)
        state.update({f"{m}.ema_B": torch.zeros_like(init[f"{m}.lora_B"][..., :2 * r if product else r])
                      for m in self.modules})
        if product:
            state.update({f"{m}.ema_A": torch.zeros_like(init[f"{m}.lora_A"][:, :2 * r]) for m in self.modules})
        state["leaf_started"] = torch.zeros(1, dtype=torch.int64)
        return state

    def init_server(self, init, *, frozen):
        r = self._rank(init)
        server = {}
        for m in self.modules:
            A, B = init[f"{m}.lora_A"], init[f"{m}.lora_B"]
            for tier, name in ((ROOT, "root"), (CLUSTER, "cluster")):
                server[f"{m}.{name}_A"] = A[:, tier_slice(tier, r)].clone()
                server[f"{m}.{name}_B"] = B[..., tier_slice(tier, r)].clone()
        for h in self.heads:
            server[h] = init[h].clone()
            server[f"root.{h}"] = init[h].clone()
        device = init[self.heads[0]].device
        server.update(stage=torch.zeros(1, dtype=torch.int64, device=device),
                      stage_round=torch.zeros(1, dtype=torch.int64, device=device),
                      root_final=torch.zeros(1, dtype=torch.int64, device=device),
                      root_change=torch.full((1,), float("nan"), dtype=torch.float64, device=device),
                      clusters=torch.full((len(self.groups),), -1, dtype=torch.int64, device=device))
        return server

    def _rank(self, tensors) -> int:
        key = f"{self.modules[0]}.lora_A"
        if key in tensors:
            return tensors[key].shape[-2] // 3
        return tensors[f"{self.modules[0]}.root_A"].shape[-2]

    def _statistic(self, tensors, m: str) -> Statistic:
        """Module m's clustering statistic from client state or the gathered rows."""
        return Statistic(tensors[f"{m}.ema_B"], tensors.get(f"{m}.ema_A"))

    def _stage(self, server) -> int:
        return int(server["stage"][0])

    def _num_clusters(self, server) -> int:
        return server[f"{self.modules[0]}.cluster_B"].shape[0]

    def _clustering_round(self, server) -> bool:
        """The last root round: clients upload their EMA bases and LSAC runs after it."""
        return self._stage(server) == ROOT and (
            bool(server["root_final"][0]) or int(server["stage_round"][0]) + 1 >= self.cfg.root_rounds)

    def _rows(self, server, clients: np.ndarray, state=None) -> torch.Tensor:
        """Each client's cluster (its row of the cluster tier and head); all 0 before clustering. A
        client without one (it missed the clustering round) is routed by its statistic in `state`."""
        if self._stage(server) == ROOT:
            return torch.zeros(len(clients), dtype=torch.int64, device=server["clusters"].device)
        rows = server["clusters"][torch.tensor(np.array(clients, dtype=np.int64), device=server["clusters"].device)]
        if bool((rows < 0).any()):
            if state is None:
                raise ValueError(f"clients {clients[(rows < 0).cpu().numpy()].tolist()} have no cluster "
                                 "(they missed the clustering round)")
            rows = torch.where(rows < 0, self._route_statistic(server, state).to(rows.device), rows)
        return rows

    def _route_statistic(self, server, tensors) -> torch.Tensor:
        """`[C]` the cluster whose centre (member mean of the clustering statistic) is closest to each
        client's own statistic in `tensors` (client state, or gathered rows), by the clustering's
        similarity; a zero statistic (no root round returned) gets the largest cluster."""
        stats = [Statistic(tensors[f"{m}.ema_B"].cpu(), tensors[f"{m}.ema_A"].cpu() if f"{m}.ema_A" in tensors
                           else None) for m in self.modules]
        centres = [Statistic(server[f"{m}.centre_B"].cpu(), server[f"{m}.centre_A"].cpu() if f"{m}.centre_A" in server
                             else None) for m in self.modules]
        clusters = server["clusters"].cpu()
        largest = int(torch.bincount(clusters[clusters >= 0], minlength=self._num_clusters(server)).argmax())
        out = torch.full((len(stats[0].B),), largest, dtype=torch.int64)
        has = self._has_statistic(tensors).cpu()
        if bool(has.any()):
            pick = lambda stat: Statistic(stat.B[has], None if stat.A is None else stat.A[has])
            out[has] = route([pick(stat) for stat in stats], centres, self.cfg.similarity)
        return out

    def _has_statistic(self, state) -> torch.Tensor:
        """`[C]` bool: clients whose EMA statistic is not zero (they trained at least one root round)."""
        return torch.stack([state[f"{m}.ema_B"].flatten(1).abs().sum(1) > 0 for m in self.modules]).any(0)

    # --- DOWN ------------------------------------------------------------------------------
    def _assemble(self, server, kept, rows: torch.Tensor | None, head_rows: torch.Tensor,
                  private_head: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stacks from the server's root, its cluster rows (None: the kept cluster slot) and the
        kept leaf; the head from the server's `head_rows`, or kept where `private_head`."""
        out = {}
        for m in self.modules:
            A, B = kept[f"{m}.lora_A"].clone(), kept[f"{m}.lora_B"].clone()
            r = A.shape[-2] // 3
            A[:, :r], B[..., :r] = server[f"{m}.root_A"], server[f"{m}.root_B"]
            if rows is not None:
                A[:, r:2 * r], B[..., r:2 * r] = server[f"{m}.cluster_A"][rows], server[f"{m}.cluster_B"][rows]
            out[f"{m}.lora_A"], out[f"{m}.lora_B"] = A, B
        for h, heads in head_rows.items():
            mine = private_head.view(-1, *([1] * (heads.dim() - 1))).bool()
            out[h] = torch.where(mine, kept[h], heads).clone()
        return out

    def _receive(self, server, state, clients, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        private = state["leaf_started"] if self._stage(server) == LEAF else torch.zeros_like(state["leaf_started"])
        return self._assemble(server, state, rows, {h: server[h][rows] for h in self.heads}, private)

    # --- the round -------------------------------------------------------------------------
    def _mode(self, stage: int) -> str:
        return self.cfg.root_aggregation if stage == ROOT else self.cfg.cluster_aggregation

    def configure_train(self, server, sampled, seen):
        """Everyone trains in the clustering round. Up: the active tier (by aggregation mode) and
        the head, per cluster; in the clustering round also the EMA statistic, gathered."""
        participants = seen if self._clustering_round(server) else sampled
        stage, stage_round = self._stage(server), int(server["stage_round"][0])
        r = self._rank(server)
        A = {m: (r, self.shapes[f"{m}.lora_A"][1]) for m in self.modules}
        B = {m: (self.shapes[f"{m}.lora_B"][0], r) for m in self.modules}
        tier = sum(r * (A[m][1] + B[m][0]) for m in self.modules) * 4
        head = sum(int(np.prod(self.shapes[h])) for h in self.heads) * 4
        every = lambda value: np.full(self.population.size, value, dtype=np.int64)
        if stage == LEAF:  # nothing leaves a client; the final cluster tier arrives once
            return RoundPlan(participants, Exchange(bytes_down=every((tier + head) if stage_round == 0 else 0)))
        means, gathered = tier_tensors(self.modules, self._mode(stage), A, B)
        means.update({h: self.shapes[h] for h in self.heads})
        up = tier + head
        if self._clustering_round(server):
            q = 2 * r if self.cfg.basis_source == "update_product" else r
            gathered.update({f"{m}.ema_B": (B[m][0], q) for m in self.modules})
            if q != r:
                gathered.update({f"{m}.ema_A": (q, A[m][1]) for m in self.modules})
            up += sum(int(np.prod(shape)) for key, shape in gathered.items() if ".ema_" in key) * 4
        groups = None if stage == ROOT else server["clusters"].cpu().numpy()
        weights, joining = None, np.zeros(0, dtype=np.int64)
        if stage == CLUSTER:  # clients without a cluster join: their statistic goes up, their update counts in nothing
            joining = participants[groups[participants] < 0]
        if len(joining):
            weights = np.asarray(self.population.num_examples, dtype=np.float64).copy()
            weights[joining] = 0.0
            groups = np.maximum(groups, 0)
        blocks = {TIER: Block(means, groups=groups, num_groups=1 if stage == ROOT else self._num_clusters(server),
                              weights=weights, bytes_up=every(up))}
        if gathered:
            blocks[GATHERED] = Block(gathered, reduce="gather", weights=weights, bytes_up=every(0))
        if len(joining):
            q = 2 * r if self.cfg.basis_source == "update_product" else r
            stats = {f"{m}.ema_B": (B[m][0], q) for m in self.modules}
            if q != r:
                stats.update({f"{m}.ema_A": (q, A[m][1]) for m in self.modules})
            joins = np.isin(np.arange(self.population.size), joining)
            blocks[JOIN] = Block(stats, reduce="gather", weights=joins.astype(np.float64),
                                 bytes_up=np.where(joins, sum(int(np.prod(s)) for s in stats.values()) * 4, 0))
        down = tier + head + (tier if stage == CLUSTER and stage_round == 0 else 0)  # + the final root, once
        return RoundPlan(participants, Exchange(blocks, bytes_down=every(down)))

    def _hooks(self, server, active: int) -> TierHooks:
        return TierHooks(self.modules, self._rank(server), active, self.cfg.gamma_cluster, self.cfg.gamma_leaf,
                         train_head=active != LEAF or self.cfg.leaf_trains_head,
                         lr_scale=self.cfg.leaf_lr_scale if active == LEAF else 1.0)

    def configure_client(self, server, state, clients, task):
        """A round trains the active tier. A new client, once clusters exist, first probes: it trains
        a fresh cluster slot on top of the root (root head included), is routed by it
        (`configure_evaluate`), and fine-tunes a leaf."""
        stage = self._stage(server)
        if task == Task.TRAIN:
            return ClientPlan(self._receive(server, state, clients, self._rows(server, clients, state)),
                              list(self.keys), self._hooks(server, stage))
        if stage == ROOT:
            return None if task == Task.PROBE else ClientPlan(
                self.configure_evaluate(server, state, clients), list(self.keys), self._hooks(server, stage))
        if task == Task.PROBE:
            none = torch.zeros_like(state["leaf_started"])
            heads = {h: server[f"root.{h}"].expand(len(clients), *server[h].shape[1:]) for h in self.heads}
            return ClientPlan(self._assemble(server, state, None, heads, none), list(self.keys),
                              self._hooks(server, CLUSTER), steps=self.cfg.probe_steps)
        return ClientPlan(self.configure_evaluate(server, state, clients), list(self.keys), self._hooks(server, LEAF))

    def finish_client(self, server, trained, state, clients):
        new = {k: trained[k] for k in self.keys}
        stage, r, lam = self._stage(server), self._rank(server), self.cfg.ema_decay
        if stage == ROOT:
            for m in self.modules:
                stat = client_statistic(self.cfg.basis_source, self._statistic(state, m), lam,
                                        trained[f"{m}.lora_B"][..., :r], trained[f"{m}.lora_A"][:, :r],
                                        server[f"{m}.root_B"], server[f"{m}.root_A"])
                new[f"{m}.ema_B"] = stat.B
                if stat.A is not None:
                    new[f"{m}.ema_A"] = stat.A
        if stage == LEAF:
            new["leaf_started"] = torch.ones_like(state["leaf_started"])
            return new, {}
        if stage == CLUSTER:  # a client joining the clusters sends the statistic it was routed by
            new.update({k: v for k, v in state.items() if ".ema_" in k})
        A = {m: trained[f"{m}.lora_A"][:, tier_slice(stage, r)] for m in self.modules}
        B = {m: trained[f"{m}.lora_B"][..., tier_slice(stage, r)] for m in self.modules}
        means, gathered = tier_tensors(self.modules, self._mode(stage), A, B)
        return new, {**means, **gathered, **{h: trained[h] for h in self.heads},
                     **{k: v for k, v in new.items() if ".ema_" in k}}

    def aggregate_train(self, server, reduced, *, round_index):
        stage = self._stage(server)
        new = dict(server)
        new["stage_round"] = server["stage_round"] + 1
        if stage == LEAF:
            return new
        r, name = self._rank(server), STAGES[stage]
        count = 1 if stage == ROOT else self._num_clusters(server)
        means, rows = reduced[TIER], reduced.blocks.get(GATHERED)
        present = (means.weights > 0).to(server["stage"].device)
        groups = None
        if stage == CLUSTER and self._mode(stage) == "product_gather":
            groups = server["clusters"].cpu()[rows.clients]
        for m in self.modules:
            A, B = aggregate_tier(m, means, rows, self._mode(stage), groups, count, r)
            for key, value in ((f"{m}.{name}_A", A), (f"{m}.{name}_B", B)):
                new[key] = torch.where(present.view(-1, 1, 1), value.to(server[key]), server[key])
        for h in self.heads:
            keep = present.view(-1, *([1] * (server[h].dim() - 1)))
            new[h] = torch.where(keep, means.values[h].to(server[h]), server[h])
        if stage == CLUSTER:
            if JOIN in reduced.blocks and len(reduced[JOIN].clients):
                joined = reduced[JOIN]
                clusters = new["clusters"].clone()
                clusters[joined.clients.to(clusters.device)] = self._route_statistic(server, joined.values).to(clusters)
                new["clusters"] = clusters
            if int(new["stage_round"][0]) >= self.cfg.cluster_rounds:
                new.update(stage=torch.full_like(server["stage"], LEAF), stage_round=torch.zeros_like(server["stage"]))
            return new
        for h in self.heads:
            new[f"root.{h}"] = new[h]
        change = relative_change(self.modules, server, new)
        new["root_change"] = torch.full_like(server["root_change"], change)
        if self._clustering_round(server):
            return self._start_cluster_stage(new, rows)
        if change <= self.cfg.root_tau:
            new["root_final"] = torch.ones_like(server["root_final"])
        return new

    def _start_cluster_stage(self, new, rows: Rows):
        """LSAC on the gathered EMA bases; the cluster tier and heads start from one shared init."""
        stats = [self._statistic(rows.values, m) for m in self.modules]
        cfg = self.cfg
        if cfg.clustering == "scalable" or (cfg.clustering == "auto" and len(rows.clients) > cfg.scalable_above):
            found = cluster_clients_scalable(stats, k_min=cfg.k_min, k_max=cfg.k_max, similarity=cfg.similarity,
                                             sigma=cfg.sigma, sigma_scale=cfg.sigma_scale,
                                             neighbors=cfg.affinity_neighbors or cfg.scalable_neighbors,
                                             seed=cfg.clustering_seed, width=cfg.scalable_width)
        else:
            found = cluster_clients(stats, k_min=cfg.k_min, k_max=cfg.k_max, similarity=cfg.similarity,
                                    sigma=cfg.sigma, sigma_scale=cfg.sigma_scale, neighbors=cfg.affinity_neighbors,
                                    seed=cfg.clustering_seed)
        clusters = torch.full_like(new["clusters"], -1)
        clusters[rows.clients.to(clusters.device)] = torch.as_tensor(found.labels).to(clusters)
        k = found.count
        new.update(self._centres(rows.values, torch.as_tensor(found.labels), k, new["stage"].device))
        for m in self.modules:
            for key in (f"{m}.cluster_A", f"{m}.cluster_B"):
                new[key] = new[key][:1].expand(k, *new[key].shape[1:]).clone()
        for h in self.heads:
            new[h] = new[h][:1].expand(k, *new[h].shape[1:]).clone()
        next_stage = CLUSTER if self.cfg.cluster_rounds > 0 else LEAF
        new.update(clusters=clusters, stage=torch.full_like(new["stage"], next_stage),
                   stage_round=torch.zeros_like(new["stage"]), root_final=torch.zeros_like(new["stage"]))
        return new

    def _centres(self, values, labels: torch.Tensor, k: int, device) -> dict[str, torch.Tensor]:
        """Each cluster's centre of the clustering statistic: the member mean of the EMA B, or of the
        EMA product B A kept as a rank-q factor pair (truncated SVD, `lowrank_aggregate`)."""
        out = {}
        for m in self.modules:
            B, A = values[f"{m}.ema_B"].double(), values.get(f"{m}.ema_A")
            if A is None:
                out[f"{m}.centre_B"] = torch.stack([B[labels == j].mean(0) for j in range(k)]).float().to(device)
                continue
            q, A = B.shape[-1], A.double()
            parts = []
            for j in range(k):
                members = labels == j
                n = int(members.sum())
                U, S, Vh = lowrank_aggregate(B[members], A[members], torch.full((n,), 1.0 / n, dtype=torch.float64),
                                             rank=q, method="exact")
                parts.append((U * S[None, :], Vh))
            out[f"{m}.centre_B"] = torch.stack([b for b, _ in parts]).float().to(device)
            out[f"{m}.centre_A"] = torch.stack([a for _, a in parts]).float().to(device)
        return out

    # --- EVALUATE --------------------------------------------------------------------------
    def global_model(self, server, init):
        """The root tier and the root head: the model every client shares."""
        out = {}
        for m in self.modules:
            A, B = init[f"{m}.lora_A"].clone(), torch.zeros_like(init[f"{m}.lora_B"])
            r = A.shape[-2] // 3
            A[:, :r], B[..., :r] = server[f"{m}.root_A"], server[f"{m}.root_B"]
            out[f"{m}.lora_A"], out[f"{m}.lora_B"] = A, B
        return {**out, **{h: server[f"root.{h}"] for h in self.heads}}

    def configure_evaluate(self, server, state, clients):
        """Root + the client's cluster + its leaf; a new client (no cluster yet) is routed to the
        cluster whose basis is closest to its probe's cluster slot, by the clustering's similarity."""
        if self._stage(server) == ROOT:
            return self._receive(server, state, clients, self._rows(server, clients))
        ids = torch.as_tensor(np.asarray(clients, dtype=np.int64), device=server["clusters"].device)
        rows = server["clusters"][ids]
        missed = (rows < 0) & self._has_statistic(state).to(rows.device)  # seen, but missed the clustering round
        if bool(missed.any()):
            rows = torch.where(missed, self._route_statistic(server, state).to(rows.device), rows)
        new = rows < 0
        if bool(new.any()):
            r = self._rank(server)
            probes = [Statistic(state[f"{m}.lora_B"][..., r:2 * r].cpu(), state[f"{m}.lora_A"][:, r:2 * r].cpu())
                      for m in self.modules]
            centres = [Statistic(server[f"{m}.cluster_B"].cpu(), server[f"{m}.cluster_A"].cpu()) for m in self.modules]
            rows = torch.where(new, route(probes, centres, self.cfg.similarity).to(rows.device), rows)
        return self._receive(server, state, clients, rows)

    def metrics(self, server) -> dict:
        """Stage the next round trains, clusters found, their agreement with the true groups (ARI),
        last relative change of the root."""
        out = {"next_stage": STAGES[self._stage(server)], "root_change": float(server["root_change"][0])}
        clusters = server["clusters"].cpu().numpy()
        seen = clusters >= 0
        out["num_clusters"] = self._num_clusters(server) if seen.any() else 0
        if seen.any() and (self.groups[seen] >= 0).all():
            from sklearn.metrics import adjusted_rand_score

            out["cluster_ari"] = float(adjusted_rand_score(self.groups[seen], clusters[seen]))
        return out

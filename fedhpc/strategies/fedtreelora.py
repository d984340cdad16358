"""FedTreeLoRA: one client tree, a cut per layer (shared trunk, specialised branches), and a
cluster expert mixed with an external expert by a private per-client, per-layer λ.

Paper: Bian, Wang, Zhang, Xu, "FedTreeLoRA: Reconciling Statistical and Functional
Heterogeneity in Federated LoRA Fine-Tuning", ICML 2026, arXiv 2603.13282. Spec: algorithms.md
§6 and Appendix B; every step marked [reconstructed] there is an option here. A "layer" is a
transformer block: all adapted modules of block l share its cut.

  warm-up   `warmup_rounds` rounds of local training from the shared init, nothing exchanged; in
            the last one every seen client (at most `tree_clients`, a seeded sample) uploads its
            A and B (and head), gathered whole.
  tree      per layer D⁽ˡ⁾_ij = ‖B_{l,i} − B_{l,j}‖_F (B of a layer = its modules' B side by side),
            one agglomerative tree on the mean distance, a nested cut c_l per layer by the
            monotone window rule (tree_cuts.py). Built once, static afterwards.
  rounds    client k in cluster S of layer l's cut trains, on every module of the layer,

                y = W0 x + λ s B̄_S Ā_S x + (1 − λ) s B̄_ext Ā_ext x,     λ = sigmoid(θ_{l,k})

            with the cluster expert (B̄_S, Ā_S) = mean of S's factors and the external expert the
            mean of everyone else's, frozen, zero where the layer has one cluster; θ never leaves
            the client. It uploads its cluster expert; the reduction is one mean block per layer
            whose groups are that layer's cut, and the external expert is derived from the
            per-cluster sums it returns: (Σ_all − Σ_S) / (N − |S|), no extra bytes.
            Bytes per round: down 2 × LoRA (1 × at a one-cluster layer), up 1 × LoRA.

A client's personalized model is one LoRA of rank 2r per module, [λ B̄_S, (1 − λ) B̄_ext] [Ā_S; Ā_ext]
(`fedhpc export --client K` folds it, io/export.py).

A seen client that did not return from the gathering round (`faults.dropout`), or was not among
its `tree_clients` sample, is outside the tree. Wherever its cluster is needed it is routed on its own, per layer to the cluster whose mean
B is nearest its own B by the tree's distance; its first return after the build is its join
round: it trains in those clusters and uploads its B (gathered, before training), the server
places it the same way and counts it from the next round on (its update of the join round counts
in no mean: its clusters were unknown when the round was planned). At evaluation an outside client
whose B never trained (zero, as a new client's) gets the global model, as a new client does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..models.cohort import group_by_block, lora_keys, mixture_keys
from ..rng import Purpose, keyed_rng
from ..runtime.exchange import Means, Rows
from .base import (Block, ClientPlan, Exchange, LocalHooks, RoundPlan, Strategy, StrategyConfig, Task, is_head,
                   is_lora_a, kept_init, register_strategy)
from .tree_cuts import Cuts, Distance, Linkage, build_tree, fixed_cuts, independent_cuts, layer_distances, tree_cuts

WARMUP, HEAD = "warmup", "head"  # block names: the gathered warm-up factors; the head per group
JOIN = "join"  # block name: the own B of clients outside the tree, gathered in their join round


def layer_block(index: int) -> str:
    """Name of layer `index`'s mean block (its modules' A and B, grouped by its cut)."""
    return f"layer{index}"


@dataclass(kw_only=True)
class FedTreeLoRAConfig(StrategyConfig):
    warmup_rounds: int = 2
    """Rounds of local-only training before the tree is built (E_warm: 2 [reconstructed])."""
    distance: Distance = "frobenius"
    """Distance between two clients' B at a layer: Frobenius [PN], or 1 − cosine (appendix C.4)."""
    linkage: Linkage = "average"
    """scipy linkage of the tree on the mean distance (not recovered: average [reconstructed])."""
    window: int = 3
    """K: a layer has at most K − 1 more clusters than the layer below it (3 [reconstructed])."""
    tau: float = 0.1
    """τ: the score of one cluster; a layer splits only if a cut's silhouette beats it (0.1 [reconstructed])."""
    cut: Literal["tree", "independent", "fixed"] = "tree"
    """How layers are cut: the window rule on one tree [PN]; ablations: `independent` (each layer's
    own tree and the same rule, no shared tree) or `fixed` (`fixed_k` clusters of the tree everywhere)."""
    fixed_k: int = 4
    """Clusters per layer for `cut: fixed` (1 is FedIT after the warm-up)."""
    external: bool = True
    """Mix in the external expert; false is the paper's cluster-only ablation (plain LoRA per cluster)."""
    mix_per: Literal["block", "module"] = "block"
    """One λ per block, shared by its adapted modules (the paper counts one scalar per block, and the
    block is the unit of the cut), or one per module [reconstructed]."""
    mix_init: float = 0.0
    """θ₀: λ = sigmoid(θ₀) at the first mixed round (0: λ = 0.5 [reconstructed])."""
    single_cluster: Literal["plain", "mixed"] = "plain"
    """A layer cut into one cluster has no external expert [PN]: `plain` trains it as plain LoRA
    (λ ≡ 1: the k = 1 ablation is then FedIT, as the paper's table reads), `mixed` keeps λ scaling
    the lone expert [reconstructed]."""
    weighting: Literal["uniform", "samples"] = "uniform"
    """Weight of a client in cluster and external means: 1 (the notes' 1/|S| means and the authors'
    FedALT code) or its training sample count."""
    tree_clients: int = 1000
    """At most this many seen clients (a seeded sample when there are more) train in the gathering
    round and make the tree, whose distances cost O(n²) per layer; the others join when first
    sampled, routed by their own B as late joiners are. 0: every seen client (the paper's rule at
    any size) [reconstructed]."""
    head: Literal["deepest", "global", "private"] = "deepest"
    """The classifier head after the warm-up: averaged per cluster of the deepest layer's cut,
    over everyone, or kept by each client [reconstructed: the notes say nothing of the head]."""

    def __post_init__(self):
        if self.warmup_rounds < 1:
            raise ValueError(f"warmup_rounds must be >= 1 (the tree is built from warm-up factors), "
                             f"got {self.warmup_rounds}")
        if self.tree_clients < 0 or self.tree_clients == 1:
            raise ValueError(f"tree_clients must be 0 (every seen client) or >= 2, got {self.tree_clients}")
        if self.window < 1 or self.fixed_k < 1:
            raise ValueError(f"window and fixed_k must be >= 1, got {self.window}, {self.fixed_k}")
        if self.keep_optimizer_state:
            raise ValueError("keep_optimizer_state must be false: every round starts from the cluster means, and the "
                             "optimizer store has no slot for the mixing logits")


class _TiedMixing(LocalHooks):
    """One θ per block: each module's logit gets the block's summed gradient (∂L/∂θ_l = Σ_m ∂L/∂θ_m
    when every θ_m = θ_l), so logits equal at the start take identical optimizer steps."""

    def __init__(self, groups: list[list[str]]):
        self.groups = groups

    def grads(self, grads, adapters):
        for keys in self.groups:
            if len(keys) > 1:
                total = torch.stack([grads[k] for k in keys]).sum(0)
                for k in keys:
                    grads[k].copy_(total)


@register_strategy("fedtreelora")
class FedTreeLoRA(Strategy):
    Config = FedTreeLoRAConfig

    def __init__(self, cfg, *, shapes, population):
        super().__init__(cfg, shapes=shapes, population=population)
        if len(np.unique(population.ranks.ranks)) > 1:
            raise ValueError("strategy fedtreelora gives every client one rank (lora.r); remove lora.ranks / "
                             "lora.client_tiers / lora.rank_choices")
        self.layers = group_by_block([k[:-len(".lora_A")] for k in self.keys if is_lora_a(k)])
        self.heads = [k for k in self.keys if is_head(k)]
        self.logits = [[mixture_keys(m)[2] for m in modules] for modules in self.layers]

    # --- state -------------------------------------------------------------------------------
    def init_server(self, init, *, frozen):
        """Round counter and whether the tree exists; the experts arrive with the tree."""
        device = init[self.heads[0]].device
        zero = torch.zeros(1, dtype=torch.int64, device=device)
        return {"tree.round": zero.clone(), "tree.built": zero.clone()}

    def init_client(self, init):
        """Its own LoRA and head (trained alone in the warm-up), and θ per module (equal within a
        block when λ is tied)."""
        state = kept_init(init, self.keys)
        device = init[self.heads[0]].device
        state.update({k: torch.full((1, 1), self.cfg.mix_init, device=device) for keys in self.logits for k in keys})
        return state

    def _built(self, server) -> bool:
        return bool(server["tree.built"][0])

    def _gathering(self, server) -> bool:
        """The last warm-up round: the tree clients upload the factors the tree is built from."""
        return not self._built(server) and int(server["tree.round"][0]) + 1 >= self.cfg.warmup_rounds

    def _mixed(self, count: int) -> bool:
        """Whether a layer cut into `count` clusters binds the two-expert mixture."""
        return self.cfg.external and (count > 1 or self.cfg.single_cluster == "mixed")

    def _weights(self) -> np.ndarray | None:
        return np.ones(self.population.size) if self.cfg.weighting == "uniform" else None

    def _tree_sample(self, seen: np.ndarray) -> np.ndarray:
        """The seen clients of the gathering round: all, or a seeded `tree_clients` of them (sorted)."""
        cap = self.cfg.tree_clients
        if cap == 0 or len(seen) <= cap:
            return seen
        rng = keyed_rng(self.population.seed, purpose=Purpose.TREE_SAMPLE)
        return np.sort(rng.choice(seen, size=cap, replace=False))

    # --- the round -----------------------------------------------------------------------------
    def configure_train(self, server, sampled, seen):
        """Warm-up: nothing travels (the last round gathers the tree clients' factors). Then one
        mean block per layer, grouped by its cut, and the head per group."""
        lora = lambda modules: {k: self.shapes[k] for m in modules for k in lora_keys(m)}
        heads = {h: self.shapes[h] for h in self.heads}
        if not self._built(server):
            if not self._gathering(server):
                return RoundPlan(sampled, Exchange())
            keys = lora(m for modules in self.layers for m in modules)
            keys.update(heads if self.cfg.head != "private" else {})
            return RoundPlan(self._tree_sample(seen), Exchange({WARMUP: Block(keys, reduce="gather",
                                                                              weights=self._weights())}))
        labels = server["tree.labels"].cpu().numpy()
        joining = sampled[labels[0, sampled] < 0]  # missed the gathering round: routed by their own B
        labels = np.maximum(labels, 0)
        weights = self._weights()
        if len(joining):  # their update counts in no mean; their B goes up to place them
            weights = np.asarray(self.population.num_examples if weights is None else weights, dtype=np.float64).copy()
            weights[joining] = 0.0
        counts = server["tree.counts"].cpu().numpy()
        blocks, down = {}, {}
        if len(joining):
            joins = np.isin(np.arange(self.population.size), joining).astype(np.float64)
            blocks[JOIN] = Block({_joined(m): self.shapes[f"{m}.lora_B"] for modules in self.layers for m in modules},
                                 reduce="gather", weights=joins)
        for index, modules in enumerate(self.layers):
            keys = lora(modules)
            blocks[layer_block(index)] = Block(keys, groups=labels[index], num_groups=int(counts[index]),
                                               weights=weights)
            down.update(keys)
            if self.cfg.external and counts[index] > 1:  # the external expert travels too
                for m in modules:
                    expert_a, expert_b, _ = mixture_keys(m)
                    down.update({expert_a: self.shapes[f"{m}.lora_A"], expert_b: self.shapes[f"{m}.lora_B"]})
        if self.cfg.head != "private":
            groups, count = (labels[-1], int(counts[-1])) if self.cfg.head == "deepest" else (None, 1)
            blocks[HEAD] = Block(heads, groups=groups, num_groups=count, weights=weights)
            down.update(heads)
        return RoundPlan(sampled, Exchange(blocks, down=down))

    def configure_client(self, server, state, clients, task):
        """Warm-up: each client trains its own LoRA and head. Then the cluster expert, θ of the
        mixed layers and the head train; the external expert is frozen. A new client fine-tunes
        every adapter key from the global model."""
        if task == Task.PROBE:
            return None
        if task == Task.FINETUNE or not self._built(server):
            return ClientPlan(self.configure_evaluate(server, state, clients), list(self.keys))
        counts = server["tree.counts"].cpu().numpy()
        mixed = [logits for logits, count in zip(self.logits, counts) if self._mixed(int(count))]
        trainable = list(self.keys) + [k for logits in mixed for k in logits]
        hooks = _TiedMixing(mixed) if self.cfg.mix_per == "block" else LocalHooks()
        return ClientPlan(self._personal(server, state, clients), trainable, hooks)

    def finish_client(self, server, trained, state, clients):
        """The default, and after the build every client's own B as it was before the round, for
        the join block of a client outside the tree (read only for those)."""
        new, upload = super().finish_client(server, trained, state, clients)
        if self._built(server):
            upload = {**upload, **{_joined(m): state[f"{m}.lora_B"] for modules in self.layers for m in modules}}
        return new, upload

    def aggregate_train(self, server, reduced, *, round_index):
        """Warm-up: count the round (build the tree after the last one). Then each layer's cluster
        means replace those of the clusters that took part, and the external experts follow."""
        new = dict(server)
        new["tree.round"] = server["tree.round"] + 1
        if not self._built(server):
            if WARMUP in reduced.blocks:
                new.update(self._build(server, reduced[WARMUP]))
            return new
        if JOIN in reduced.blocks and len(reduced[JOIN].clients):
            joined = reduced[JOIN]
            labels = new["tree.labels"].clone()
            routed = self._route(server, {m: joined.values[_joined(m)] for modules in self.layers for m in modules})
            labels[:, joined.clients.to(labels.device)] = routed.to(labels)
            new["tree.labels"] = labels
        for index, modules in enumerate(self.layers):
            self._update(new, server, reduced[layer_block(index)], [k for m in modules for k in lora_keys(m)],
                         f"tree.weight{index}", modules)
        if self.cfg.head != "private":
            self._update(new, server, reduced[HEAD], self.heads, "tree.head_weight", [])
        return new

    def _update(self, new, server, means: Means, keys: list[str], weight_key: str, modules: list[str]) -> None:
        present = means.weights > 0
        for key in keys:
            keep = present.view(-1, *([1] * (means.values[key].dim() - 1)))
            new[key] = torch.where(keep, means.values[key], server[key].cpu()).to(server[key])
        new[weight_key] = torch.where(present, means.weights, server[weight_key].cpu()).to(server[weight_key])
        new.update(self._externals(new, modules, new[weight_key]))

    # --- the tree ------------------------------------------------------------------------------
    def _build(self, server, rows: Rows) -> dict[str, torch.Tensor]:
        """Distances, tree and cuts from the gathered warm-up factors; cluster experts, external
        experts and heads as the cut's means of the same factors."""
        device = server["tree.round"].device
        clients = rows.clients.numpy()
        weights = torch.ones(len(clients), dtype=torch.float64) if self.cfg.weighting == "uniform" else rows.weights
        factors = [torch.cat([rows.values[f"{m}.lora_B"].flatten(1) for m in modules], dim=1)  # [n, Σ d_out r]
                   for modules in self.layers]
        distances = [layer_distances(b, self.cfg.distance) for b in factors]
        tree, cuts = self._cut(distances)
        labels = np.full((len(self.layers), self.population.size), -1, dtype=np.int64)
        labels[:, clients] = cuts.labels
        out = {"tree.built": torch.ones(1, dtype=torch.int64), "tree.labels": torch.as_tensor(labels),
               "tree.counts": torch.as_tensor(cuts.counts), "tree.scores": torch.as_tensor(cuts.scores),
               "tree.linkage": torch.as_tensor(tree, dtype=torch.float64)}
        for index, modules in enumerate(self.layers):
            group = torch.as_tensor(cuts.labels[index])
            keys = [k for m in modules for k in lora_keys(m)]
            out.update(_group_means(rows.values, keys, group, weights, int(cuts.counts[index])))
            out[f"tree.weight{index}"] = torch.zeros(int(cuts.counts[index]), dtype=torch.float64).index_add_(
                0, group, weights)
            out.update(self._externals(out, modules, out[f"tree.weight{index}"]))
        if self.cfg.head != "private":
            deepest = self.cfg.head == "deepest"
            group = torch.as_tensor(cuts.labels[-1] if deepest else np.zeros(len(clients), dtype=np.int64))
            count = int(cuts.counts[-1]) if deepest else 1
            out.update(_group_means(rows.values, self.heads, group, weights, count))
            out["tree.head_weight"] = torch.zeros(count, dtype=torch.float64).index_add_(0, group, weights)
        return {k: v.to(device) for k, v in out.items()}

    def _cut(self, distances: list[np.ndarray]) -> tuple[np.ndarray, Cuts]:
        n, cfg = distances[0].shape[0], self.cfg
        if n < 2:
            one = np.ones(len(distances), dtype=np.int64)
            labels = np.zeros((len(distances), n), dtype=np.int64)
            return np.zeros((0, 4)), Cuts(one, labels, np.full(len(distances), cfg.tau))
        if cfg.cut == "tree":
            return tree_cuts(distances, method=cfg.linkage, window=cfg.window, tau=cfg.tau)
        tree = build_tree(sum(distances) / len(distances), cfg.linkage)
        if cfg.cut == "fixed":
            return tree, fixed_cuts(tree, n, len(distances), cfg.fixed_k)
        return tree, independent_cuts(distances, method=cfg.linkage, window=cfg.window, tau=cfg.tau)

    def _externals(self, tensors, modules: list[str], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each cluster's external expert from the cluster means and weights (sums = means x weights):
        (Σ_all − Σ_S) / (W_all − W_S); zero at a one-cluster layer."""
        if not self.cfg.external:
            return {}
        out = {}
        for m in modules:
            for key, expert in zip(lora_keys(m), mixture_keys(m)[:2]):
                means = tensors[key]
                w = weights.to(means.device).view(-1, *([1] * (means.dim() - 1)))
                sums = means.double() * w
                others = w.sum() - w
                external = (sums.sum(0, keepdim=True) - sums) / others.clamp(min=1e-300)
                out[expert] = torch.where(others > 0, external, torch.zeros_like(external)).to(means.dtype)
        return out

    def _route(self, server, own_B: dict[str, torch.Tensor]) -> torch.Tensor:
        """`[layers, C]` per layer the cluster whose mean B (the server's cluster expert) is nearest
        each client's own B `[C, d_out, r]` per module, by the tree's distance."""
        out = []
        for modules in self.layers:
            mine = torch.cat([own_B[m].detach().cpu().flatten(1) for m in modules], dim=1)
            means = torch.cat([server[f"{m}.lora_B"].detach().cpu().flatten(1) for m in modules], dim=1)
            d = layer_distances(torch.cat([mine, means]).float(), self.cfg.distance)[:len(mine), len(mine):]
            out.append(torch.as_tensor(np.argmin(d, axis=1), dtype=torch.int64))
        return torch.stack(out)

    def _labels(self, server, state, clients) -> np.ndarray:
        """`[layers, C]` each client's cluster per layer; a client outside the tree routed by its own B."""
        labels = server["tree.labels"].cpu().numpy()[:, clients]
        outside = labels[0] < 0
        if outside.any():
            routed = self._route(server, {m: state[f"{m}.lora_B"] for modules in self.layers for m in modules})
            labels = np.where(outside[None, :], routed.numpy(), labels)
        return labels

    # --- what a client holds ---------------------------------------------------------------------
    def _personal(self, server, state, clients) -> dict[str, torch.Tensor]:
        """Per layer its cluster's expert, the external expert and the client's θ (mixed layers),
        and the head of its group (or its own)."""
        labels = self._labels(server, state, clients)
        counts = server["tree.counts"].cpu().numpy()
        device = server["tree.labels"].device
        out = {}
        for index, modules in enumerate(self.layers):
            rows = torch.as_tensor(labels[index], device=device)
            mixed = self._mixed(int(counts[index]))
            for m in modules:
                for key in lora_keys(m):
                    out[key] = server[key][rows].clone()
                if mixed:
                    expert_a, expert_b, logit = mixture_keys(m)
                    out[expert_a], out[expert_b] = server[expert_a][rows].clone(), server[expert_b][rows].clone()
                    out[logit] = state[logit].clone()
        if self.cfg.head == "private":
            out.update({h: state[h].clone() for h in self.heads})
        else:
            rows = torch.as_tensor(labels[-1] if self.cfg.head == "deepest" else np.zeros(len(clients), dtype=np.int64),
                                   device=device)
            out.update({h: server[h][rows].clone() for h in self.heads})
        return out

    def _global(self, server) -> dict[str, torch.Tensor]:
        """`[1, ...]` plain LoRA: every module's mean over all clusters (= the mean over all clients),
        and the head's unless heads are private."""
        out = {}
        for index, modules in enumerate(self.layers):
            out.update(_pooled(server, [k for m in modules for k in lora_keys(m)], server[f"tree.weight{index}"]))
        if self.cfg.head != "private":
            out.update(_pooled(server, self.heads, server["tree.head_weight"]))
        return out

    # --- evaluation ----------------------------------------------------------------------------
    def configure_evaluate(self, server, state, clients):
        """Warm-up: the client's own LoRA and head. Then its personalized mixture; a client outside
        the tree (a new one) gets the global model (its own head when heads are private)."""
        if not self._built(server):
            return {k: state[k].clone() for k in self.keys}
        inside = server["tree.labels"].cpu()[0, torch.as_tensor(np.asarray(clients))] >= 0
        trained = torch.stack([state[f"{m}.lora_B"].flatten(1).abs().sum(1) > 0 for modules in self.layers
                               for m in modules]).any(0).cpu()
        personal = inside | trained  # outside the tree with a trained B: routed (missed the gathering round)
        if bool(personal.all()):
            return self._personal(server, state, clients)
        shared = self._global(server)
        out = {k: v.expand(len(clients), *v.shape[1:]).clone() for k, v in shared.items()}
        out.update({h: state[h].clone() for h in self.heads if h not in out})
        if not bool(personal.any()):
            return out
        mine = self._personal(server, state, clients)  # one layout for the call: the global model as λ = 1
        keep = personal.to(next(iter(mine.values())).device)
        for key, value in mine.items():
            if key in out:
                glob = out[key]
            elif key.endswith(".mix_logit"):
                glob = torch.full_like(value, float("inf"))
            else:
                glob = torch.zeros_like(value)
            mine[key] = torch.where(keep.view(-1, *([1] * (value.dim() - 1))), value, glob)
        return mine

    def global_model(self, server, init):
        """The mean of every client's cluster expert (and head): None before the tree, or when
        heads are private."""
        if not self._built(server) or self.cfg.head == "private":
            return None
        return self._global(server)

    def metrics(self, server) -> dict:
        """Clusters per layer (`cuts`), each chosen cut's score, and where the data knows its true
        grouping (per layer, or one for all layers), the cut's ARI against it per layer."""
        if not self._built(server):
            return {}
        labels = server["tree.labels"].cpu().numpy()
        out = {"cuts": [int(c) for c in server["tree.counts"].cpu()],
               "cut_scores": [float(s) for s in server["tree.scores"].cpu()]}
        truth = self.population.layer_groups
        if truth is None and self.population.groups.size and (self.population.groups >= 0).all():
            truth = np.tile(self.population.groups, (len(self.layers), 1))
        if truth is not None and len(truth) == len(self.layers):
            from sklearn.metrics import adjusted_rand_score

            inside = labels[0] >= 0
            out["layer_ari"] = [float(adjusted_rand_score(t[inside], found[inside])) for t, found in zip(truth, labels)]
        return out


def _joined(module: str) -> str:
    """Key of a module's own B in the join block (apart from the cluster expert's `lora_B`)."""
    return f"join.{module}.lora_B"


def _group_means(values: dict[str, torch.Tensor], keys: list[str], group: torch.Tensor, weights: torch.Tensor,
                 count: int) -> dict[str, torch.Tensor]:
    """`[count, ...]` float32 weighted means of rows `values[key]` `[n, ...]` per group, summed in float64."""
    total = torch.zeros(count, dtype=torch.float64).index_add_(0, group, weights)
    out = {}
    for key in keys:
        rows = values[key].double()
        w = weights.view(-1, *([1] * (rows.dim() - 1)))
        sums = torch.zeros(count, *rows.shape[1:], dtype=torch.float64).index_add_(0, group, rows * w)
        out[key] = (sums / total.view(-1, *([1] * (rows.dim() - 1))).clamp(min=1e-300)).float()
    return out


def _pooled(server: dict[str, torch.Tensor], keys: list[str], weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """`[1, ...]` weighted mean over the groups of each key's `[groups, ...]` means."""
    out = {}
    for key in keys:
        w = weights.to(server[key].device).view(-1, *([1] * (server[key].dim() - 1)))
        out[key] = ((server[key].double() * w).sum(0, keepdim=True) / w.sum()).to(server[key].dtype)
    return out

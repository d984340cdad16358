"""ILoRA: QR-orthonormal init, concatenated-QR aggregation of heterogeneous ranks, control variates.

Paper: Zhou, Liu, Shang, "ILoRA: Federated LoRA for Heterogeneous Client Aggregation",
arXiv 2511.16069; official code junchaozhouu-netizen/ILoRA. Spec: algorithms.md §4.

Init (§4.3, as the official code; identical everywhere, so nothing is sent):
    Q, R = qr(W0) ;  Q_r = Q[:, :r_max] ;  R_r = R[:r_max]
    c = init_scale · sqrt(d_out d_in) / ‖Q_r R_r‖_F           (shrink: the initial product is tiny)
    B = √c Q_r ;  A = √c R_r ;  W_base = W0 − compensation · B A   (the `base_delta`)
The official code runs this per client rank; with heterogeneous ranks we compute it once at
r_max and clients take truncations, so W_base is one shared weight [reconstructed].

Aggregation (§4.5), per module, P participants, w_k = p_k s_k (`scale_across_ranks`) or p_k
(the official code, which forms the product without the LoRA scaling):
    B_c = [B_1 … B_P] ,  A_c = [w_1 A_1; … ; w_P A_P] ,  ΔW = B_c A_c
    qr  (faithful): Q R = qr(ΔW) ; B = Q[:, :r_max] ,  A = R[:r_max]    client k: B[:, :r_k], A[:r_k]
         computed without ΔW: Q_ρ = orth(B_c (A_c[:, :ρ])) , R_ρ = (Q_ρᵀ B_c) A_c  [reconstructed],
         equal to the dense QR's leading ρ columns up to signs (Q_ρ R_ρ is the same).
    svd (optimal): top-r_max SVD of ΔW through the factors (kernels.lowrank_aggregate),
         B = U √Σ, A = √Σ Vᵀ — the rank-ρ truncations are then best rank-ρ approximations.
With `scale_across_ranks` the server factors are in product units and client k divides A by
s_k [reconstructed fix of the official code's omission]; without it they are used as they are.
    head <- Σ_k p_k head_k

Rank-aware control variates (§4.4, `use_control`): the server variate c lives at r_max shape,
client k reads c[:r_k] (A) / c[:, :r_k] (B), and each local gradient becomes g + (c − c_k)
before AdamW or SGD. The new client variate is the mean raw minibatch gradient of the local
run (SCAFFOLD option II, exact for SGD; the official code's option I spends an extra full
gradient pass at the received weights) [reconstructed]; Δc_k = c_k⁺ − c_k is uploaded,
zero-padded, and c <- c + (1/N) Σ_k Δc_k (N: `control_population`, 0 = participants).
Factor coordinates rotate after each QR, so variates are only approximately consistent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..kernels import orthonormalize
from ..models.cohort import base_delta_key
from ..models.ranks import mask_to_ranks
from .base import LocalHooks, StrategyConfig, register_strategy
from .factors import FACTORS, FactorStrategy, weighted_factors
from .flexlora import svd_factors

__all__ = ["ILoRAConfig", "ILoRA", "qr_factors"]

CV, DCV = ".cv", ".dcv"  # suffixes of control-variate keys: the variate, and a client's change of it


@dataclass(kw_only=True)
class ILoRAConfig(StrategyConfig):
    aggregation: Literal["qr", "svd"] = "qr"
    """qr: the paper's concatenated-QR truncation (faithful); svd: the optimal truncated SVD [reconstructed]."""
    scale_across_ranks: bool = True
    """Weight client k's product by its LoRA scaling s_k = alpha/r_k and divide by the receiver's s
    [reconstructed fix]; false reproduces the official code (products formed without s_k)."""
    init: Literal["qr", "default"] = "qr"
    """qr: orthonormal init from the frozen weights (§4.3); default: peft's (A Kaiming, B = 0)."""
    init_scale: float = 1e-4
    """Shrink of the initial product: ‖B A‖_F = init_scale · sqrt(d_out d_in)."""
    compensation: float = 1.0
    """W_base = W0 − compensation · B A (the official `lora_scale_factor`, 1 in all its runs). With
    scale_across_ranks, 1 cancels the initial product exactly for r_max clients; without, use alpha/r."""
    use_control: bool = False
    """Rank-aware control variates added to the local gradients."""
    control_population: int = 0
    """N in c <- c + (1/N) Σ Δc_k; 0: the number of participants of the round."""

    def __post_init__(self):
        if self.init_scale <= 0 or self.control_population < 0:
            raise ValueError("init_scale must be > 0 and control_population >= 0")
        if self.compensation < 0:
            raise ValueError(f"compensation must be >= 0 (W_base = W0 − compensation · B A), got {self.compensation}")


def qr_factors(part, weights, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading `rank` columns of Q and rows of R of qr(Σ_k weights_k B_k A_k), without forming it."""
    Bc, Ac = weighted_factors(part, weights)
    Q, _ = orthonormalize(Bc @ Ac[:, :rank])
    return Q, (Q.mT @ Bc) @ Ac


class _ControlHooks(LocalHooks):
    """g <- g + (c − c_k) per client, and the mean raw gradient of the run for the new c_k."""

    def __init__(self, correction: dict[str, torch.Tensor], own: dict[str, torch.Tensor]):
        self.correction, self.own = correction, own
        self.raw: dict[str, torch.Tensor] = {}
        self.sums = {k: torch.zeros_like(v) for k, v in correction.items()}
        self.steps = torch.zeros(next(iter(correction.values())).shape[0], device=next(iter(own.values())).device)

    def grads(self, grads, adapters):
        for key, corr in self.correction.items():
            self.raw[key] = grads[key].detach().clone()
            grads[key].add_(corr)

    def stepped(self, active):
        self.steps += active
        for key, g in self.raw.items():
            self.sums[key] += g * active.view(-1, *([1] * (g.dim() - 1)))

    def results(self):
        count = self.steps.clamp(min=1)
        return {key + DCV: self.sums[key] / count.view(-1, *([1] * (s.dim() - 1))) - self.own[key]
                for key, s in self.sums.items()}


@register_strategy("ilora")
class ILoRA(FactorStrategy):
    Config = ILoRAConfig

    @property
    def product_units(self) -> bool:
        return self.cfg.scale_across_ranks

    # --- state ----------------------------------------------------------------------------
    def controlled(self) -> list[str]:
        return list(self.keys) if self.cfg.use_control else []

    def init_client(self, init):
        return {k + CV: torch.zeros_like(init[k]) for k in self.controlled()}

    def init_server(self, init, *, frozen):
        server = super().init_server(init, frozen=frozen)
        server.update({k + CV: torch.zeros_like(init[k]) for k in self.controlled()})
        if self.cfg.init == "default":
            return server
        for m in self.modules:
            B, A = self.qr_init(frozen[m].double(), self.ranks.max)
            server[f"{m}.lora_B"] = self.store(B, server[f"{m}.lora_B"])
            server[f"{m}.lora_A"] = self.store(A, server[f"{m}.lora_A"])
            server[base_delta_key(m)] = self.store(-self.cfg.compensation * (B @ A), server[f"{m}.lora_A"])
        return server

    def qr_init(self, w0: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        Q, R = torch.linalg.qr(w0, mode="reduced")
        Qr, Rr = Q[:, :rank], R[:rank]
        c = self.cfg.init_scale * (w0.shape[0] * w0.shape[1]) ** 0.5 / torch.linalg.matrix_norm(Qr @ Rr)
        return Qr * c.sqrt(), Rr * c.sqrt()

    # --- DOWN / LOCAL / UP ----------------------------------------------------------------
    def sent_down(self):
        return {**super().sent_down(), **{k + CV: self.shapes[k] for k in self.controlled()}}

    def gathered_up(self):
        return {**super().gathered_up(), **{k + DCV: self.shapes[k] for k in self.controlled()}}

    def configure_client(self, server, state, clients, task):
        plan = super().configure_client(server, state, clients, task)
        if plan is None or not self.cfg.use_control:
            return plan
        own = {k: state[k + CV] for k in self.controlled()}
        shared = {k: server[k + CV].expand(len(clients), *server[k + CV].shape[1:]) for k in self.controlled()}
        plan.hooks = _ControlHooks(mask_to_ranks({k: shared[k] - own[k] for k in own}, self.ranks.of(clients)), own)
        return plan

    def finish_client(self, server, trained, state, clients):
        return {k + CV: state[k + CV] + trained[k + DCV] for k in self.controlled()}, trained

    # --- AGGREGATE ------------------------------------------------------------------------
    def aggregate_train(self, server, reduced, *, round_index):
        new = super().aggregate_train(server, reduced, round_index=round_index)  # the head's mean
        for m in self.modules:
            part = self.gathered_factors(reduced, m)
            weights = part.p * part.s if self.cfg.scale_across_ranks else part.p
            if self.cfg.aggregation == "qr":
                B, A = qr_factors(part, weights, self.ranks.max)
            else:
                B, A = svd_factors(part, weights, self.ranks.max)
            new[f"{m}.lora_B"] = self.store(B, server[f"{m}.lora_B"])
            new[f"{m}.lora_A"] = self.store(A, server[f"{m}.lora_A"])
        if self.cfg.use_control:
            rows = reduced[FACTORS]
            population = self.cfg.control_population or len(rows.clients)
            for k in self.controlled():
                change = rows.values[k + DCV].double().sum(0) / population
                new[k + CV] = server[k + CV] + change.unsqueeze(0).to(server[k + CV].dtype)
        return new

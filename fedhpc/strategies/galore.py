"""GaLore on a cohort of clients: projectors from the full-space gradient, Adam in projected coordinates.

GaLore (Zhao et al., ICML 2024; algorithms.md §2.13) for an adapted weight W `[m, n]` (m = d_out,
n = d_in) with gradient G: every refresh, P = the top-r singular vectors of G, right (P `[r, n]`,
R = G Pᵀ `[m, r]`) when m ≥ n, left (P `[m, r]`, R = Pᵀ G `[r, n]`) otherwise; Adam runs on R and
the step N goes back through P:  W ← W − η α_g N P  (right)  or  W − η α_g P N  (left).

Here the update lives in the cohort's factored variant, ΔW_c = update_B update_A, with one slot
of r per projector window j (the first at local step 0, the next every `refresh_steps` steps):

    right: update_A = [P_1; …; P_w] (fixed)   update_B = [Z_1 … Z_w] (trained)    ΔW = Σ_j Z_j P_j
    left:  update_B = [P_1 … P_w]   (fixed)   update_A = [Z_1; …; Z_w] (trained)  ΔW = Σ_j P_j Z_j

so the gradient of window j's Z is exactly the projected gradient R = G P_jᵀ (or P_jᵀ G), and
Z_j ← Z_j − η α_g N is GaLore's W ← W − η α_g N P_j. Only the current window trains; the Adam
moments M, V `[C, *R.shape]` are kept across a refresh (GaLore's code reinterprets them in the
new basis). The full gradient G is needed only at a refresh: the hooks bind a zero dense
`<module>.client_delta` for that one step (`LocalHooks.probes`), whose gradient is G.

`GaLorePass` is both the pass's hooks and its optimizer (the head and biases take the run's
plain AdamW); all it keeps beyond one pass's training lives in the plan's tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..kernels import lowrank_aggregate
from ..models.cohort import client_delta_key, factored_keys
from ..rng import Purpose, keyed_rng
from ..train.optim import OptimConfig, StackedOptimizer
from ..train.plan import LocalHooks

__all__ = ["Side", "GaLorePass", "top_singular", "project"]


@dataclass(frozen=True)
class Side:
    """One adapted module's geometry: which factor is the projector and which trains."""
    module: str
    index: int
    """Position among the adapted modules (keys its random streams)."""
    d_out: int
    d_in: int
    right: bool
    """Right projection (P `[r, d_in]`); else left (P `[d_out, r]`)."""

    @property
    def trained(self) -> str:
        """Key of the trained factor Z: update_B (right) or update_A (left)."""
        return factored_keys(self.module)[1 if self.right else 0]

    @property
    def fixed(self) -> str:
        """Key of the projector factor: update_A (right) or update_B (left)."""
        return factored_keys(self.module)[0 if self.right else 1]

    @property
    def shared_dim(self) -> int:
        """The axis every client's projected moments share: the rows d_out (right) or columns d_in (left)."""
        return self.d_out if self.right else self.d_in

    def moment_shape(self, rank: int) -> tuple[int, int]:
        """Shape of R, M, V: `[d_out, r]` (right) or `[r, d_in]` (left)."""
        return (self.d_out, rank) if self.right else (rank, self.d_in)

    def projector_shape(self, rank: int) -> tuple[int, int]:
        return (rank, self.d_in) if self.right else (self.d_out, rank)

    def slot(self, window: int, rank: int) -> tuple[slice, ...]:
        """Index of window `window`'s Z in the trained factor `[C, ...]`: r columns of update_B
        (right) or r rows of update_A (left)."""
        cut = slice(window * rank, (window + 1) * rank)
        return (slice(None), slice(None), cut) if self.right else (slice(None), cut)

    def fixed_slot(self, window: int, rank: int) -> tuple[slice, ...]:
        """Index of window `window`'s projector in the fixed factor: rows of update_A (right) or
        columns of update_B (left)."""
        cut = slice(window * rank, (window + 1) * rank)
        return (slice(None), cut) if self.right else (slice(None), slice(None), cut)

    def moment_view(self, moments: torch.Tensor) -> torch.Tensor:
        """`[C, shared_dim, r]`: the moments with the shared axis first (AJIVE's rows)."""
        return moments if self.right else moments.transpose(-1, -2)


def top_singular(grad: torch.Tensor, rank: int, *, right: bool, method: Literal["exact", "randomized"] = "exact",
                 seeds: list[int] | None = None, power_iters: int = 2) -> torch.Tensor:
    """Projectors of `grad` `[C, m, n]`: its top-`rank` right singular vectors `[C, rank, n]`
    (`right`) or left ones `[C, m, rank]`, through `fedhpc.kernels.lowrank_aggregate` with the
    identity on the small side (grad = B A with B = grad, A = I_n when m ≥ n). "randomized" runs
    the kernel's range finder client by client, each with its own keyed seed, so a client's
    projector does not depend on which clients share its pass."""
    C, m, n = grad.shape
    g = grad.detach().float().unsqueeze(1)                                  # [C, 1, m, n]
    if m >= n:
        B, A = g, torch.eye(n, dtype=g.dtype, device=g.device).expand(C, 1, n, n)
    else:
        B, A = torch.eye(m, dtype=g.dtype, device=g.device).expand(C, 1, m, m), g
    one = torch.ones(1, dtype=g.dtype, device=g.device)
    if method == "exact":
        U, _, Vh = lowrank_aggregate(B, A, one, rank=rank, method="exact")
    else:
        parts = [lowrank_aggregate(B[c], A[c], one, rank=rank, method="randomized", power_iters=power_iters,
                                   seed=seeds[c]) for c in range(C)]
        U, Vh = torch.stack([u for u, _, _ in parts]), torch.stack([v for _, _, v in parts])
    return _signed(Vh, dim=-1) if right else _signed(U, dim=-2)


def _signed(vectors: torch.Tensor, *, dim: int) -> torch.Tensor:
    """Singular vectors (along `dim`) flipped so that each one's largest-magnitude entry is positive.
    An SVD's signs are arbitrary, and GaLore's moments carry over a refresh into the new basis, so
    a refresh's result would otherwise depend on the SVD routine (CPU vs GPU, exact vs randomized)."""
    peak = vectors.gather(dim, vectors.abs().argmax(dim, keepdim=True))
    return vectors * torch.where(peak < 0, -1.0, 1.0).to(vectors.dtype)


def project(grad: torch.Tensor, projector: torch.Tensor, *, right: bool) -> torch.Tensor:
    """R = G Pᵀ `[C, m, r]` (right) or Pᵀ G `[C, r, n]` (left)."""
    return grad @ projector.transpose(1, 2) if right else projector.transpose(1, 2) @ grad


class GaLorePass(LocalHooks):
    """One pass of clients' GaLore training: the hooks that set projectors and shape the
    gradients, and the optimizer (`optimizer(cfg)` binds the run's settings; `step`).

    Args:
        sides: the adapted modules.
        rank: projection rank r.
        windows: projectors per round (update rank r × windows).
        refresh_steps: local steps between projectors (windows > 1).
        given: True where window 0's projector is already in the start factors (a shared
            projector from the server); else it comes from the first batch's gradient.
        scale: GaLore's α_g.
        warm: per module, `(first moment, second moment)` started from a synchronised estimate, so
            that moment is not bias-corrected under `bias_correction="warm"`.
        bias_correction: "warm" (Adam's correction only for moments that started at zero),
            "round" or "global" (Adam's correction on the step counter, reset per round or not).
        svd / power_iters: how projectors are computed (`top_singular`).
        client_ids, seed, round_index: keys of the randomized projector's streams.
    """

    def __init__(self, sides: list[Side], *, rank: int, windows: int, refresh_steps: int, given: bool,
                 scale: float, warm: dict[str, tuple[bool, bool]], bias_correction: str, svd: str, power_iters: int,
                 client_ids: np.ndarray, seed: int, round_index: int, count: int, device: torch.device):
        self.sides, self.rank, self.windows, self.refresh = sides, rank, windows, refresh_steps
        self.given, self.scale, self.warm, self.bias_correction = given, scale, warm, bias_correction
        self.svd, self.power_iters = svd, power_iters
        self.client_ids, self.seed, self.round_index = client_ids, seed, round_index
        self.count, self.device = count, device
        self.step_index = 0
        self.fresh: dict[str, torch.Tensor] = {}
        self.plain: StackedOptimizer | None = None
        self.cfg: OptimConfig | None = None
        self.state: dict[str, torch.Tensor] | None = None

    # --- hooks --------------------------------------------------------------------------------
    def window(self) -> int:
        return 0 if self.refresh == 0 else min(self.step_index // self.refresh, self.windows - 1)

    def refreshes(self, step: int) -> bool:
        """Whether local step `step` opens a window whose projector comes from the gradient."""
        if step == 0:
            return not self.given
        return self.refresh > 0 and step % self.refresh == 0 and step // self.refresh < self.windows

    def probes(self, step):
        self.step_index = step
        if not self.refreshes(step):
            return {}
        return {client_delta_key(s.module): torch.zeros(self.count, s.d_out, s.d_in, device=self.device)
                for s in self.sides}

    def probed(self, grads, adapters):
        window = self.window()
        for s in self.sides:
            G = grads[client_delta_key(s.module)]
            seeds = None
            if self.svd == "randomized":
                seeds = [int(keyed_rng(self.seed, int(c), self.round_index, self.step_index, s.index,
                                       purpose=Purpose.PROJECTOR_SKETCH).integers(2 ** 62)) for c in self.client_ids]
            P = top_singular(G, self.rank, right=s.right, method=self.svd, seeds=seeds, power_iters=self.power_iters)
            adapters[s.fixed][s.fixed_slot(window, self.rank)] = P.to(adapters[s.fixed].dtype)
            self.fresh[s.module] = project(G, P.to(G.dtype), right=s.right)

    def grads(self, grads, adapters):
        """Only the current window trains: its projected gradient (recomputed with the new projector
        at a refresh), zeros elsewhere."""
        window = self.window()
        for s in self.sides:
            g = grads[s.trained]
            current = self.fresh.pop(s.module, None)
            if current is None:
                current = g[s.slot(window, self.rank)].clone()
            g.zero_()
            g[s.slot(window, self.rank)] = current

    # --- optimizer ----------------------------------------------------------------------------
    def optimizer(self, cfg: OptimConfig) -> "GaLorePass":
        """Bind the run's `train.optimizer` (lr, betas, eps; weight decay acts on the head only)."""
        if cfg.name != "adamw":
            raise ValueError(f"strategy fedgalore runs Adam in projected coordinates: train.optimizer.name must "
                             f"be 'adamw', got {cfg.name!r}")
        self.cfg, self.plain = cfg, StackedOptimizer(cfg)
        return self

    def init_state(self, params):
        raise ValueError("fedgalore's plan brings its optimizer state (its moments start from the server's profile)")

    def corrections(self, step: torch.Tensor, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adam's bias corrections `[C]` (c1, c2) of a module's moments at each client's step count:
        1 − β^t, or 1 for a moment that started from a synchronised estimate (`bias_correction="warm"`)."""
        (b1, b2), (warm_m, warm_v) = self.cfg.betas, self.warm[module]
        t = step.clamp(min=1).to(torch.float64)
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        if self.bias_correction == "warm":
            c1, c2 = (torch.ones_like(c1) if warm_m else c1), (torch.ones_like(c2) if warm_v else c2)
        return c1, c2

    def results(self):
        """The moment estimates each client's last step used, M̂ = M / c1 and V̂ = V / c2 (`<module>.m_hat`,
        `<module>.v_hat`): what it uploads for synchronisation. (The raw V of a round that started at
        zero holds only 1 − β2^τ of its mass, about 1 % after 10 steps.)"""
        if self.state is None:
            return {}
        out = {}
        for s in self.sides:
            c1, c2 = self.corrections(self.state["step"], s.module)
            out[f"{s.module}.m_hat"] = self.state[f"{s.module}.exp_avg"] / c1.to(torch.float32).view(-1, 1, 1)
            out[f"{s.module}.v_hat"] = self.state[f"{s.module}.exp_avg_sq"] / c2.to(torch.float32).view(-1, 1, 1)
        return out

    @torch.no_grad()
    def step(self, params, grads, state, active=None, lr_scale=1.0, movable=None):
        trained = {s.trained for s in self.sides}
        self.plain.step(params, {k: g for k, g in grads.items() if k not in trained}, state, active, lr_scale,
                        movable)                                               # the head; counts the step
        self.state = state
        (b1, b2), eps = self.cfg.betas, self.cfg.eps
        act = torch.ones_like(state["step"], dtype=torch.bool) if active is None else active
        lr = self.cfg.lr * lr_scale * self.scale
        for s in self.sides:
            c1, c2 = self.corrections(state["step"], s.module)
            shape = (-1, 1, 1)
            keep = act.view(shape)
            R = grads[s.trained][s.slot(self.window(), self.rank)]
            M, V = state[f"{s.module}.exp_avg"], state[f"{s.module}.exp_avg_sq"]
            new_m = torch.lerp(M, R, 1 - b1)
            new_v = V * b2 + R * R * (1 - b2)
            N = (new_m / c1.to(M.dtype).view(shape)) / ((new_v / c2.to(V.dtype).view(shape)).sqrt() + eps)
            M.copy_(torch.where(keep, new_m, M))
            V.copy_(torch.where(keep, new_v, V))
            Z = params[s.trained][s.slot(self.window(), self.rank)]
            params[s.trained][s.slot(self.window(), self.rank)] = torch.where(keep, Z - lr * N, Z)

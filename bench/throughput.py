"""End-to-end local-training throughput: fedhpc's cohort trainer against a per-client peft loop.

    python bench/throughput.py [--quick] [--regime overhead|compute|both] [--device cpu|cuda]
                               [--threads N] [--repeat N] [--profile] [--precision fp32|bf16]
                               [--compile] [--no-sweep] [--peers]
    (or: fedhpc bench throughput ...)

`--precision bf16` runs both trainers' forward under bf16 autocast (fedhpc: `train.precision`;
the peft loop: `torch.autocast` around its forward), so the two still do the same work.
`--compile` compiles the cohort trainer (`train.compile`); its first pass of each size pays
the compiler and is left out as warm-up; the probe still times the eager path.
`--peers` then runs bench/peers.py: the same FedIT rounds on fedhpc, the sequential loop and
Flower's simulation engine, each in its own process tree, with client-updates/s and peak memory
(needs `flwr[simulation]`: run it with .venv-bench/bin/python, see requirements-bench.txt).

The same clients (same data, same batches, same AdamW hyperparameters, same optimizer steps)
are trained for one round two ways:

  cohort      fedhpc: `local_train` over passes of `clients_per_pass` clients, as
              the round loop drives it (`experiment._train_round` / `clients.train_pass`:
              split_passes, runnable, gather the pass's adapters,
              fresh optimizer state per pass, train, scatter back). clients_per_pass is what
              `probe_clients_per_pass` picks, as `fedhpc run` does by default.
  sequential  what a researcher writes by hand: ONE peft model (`get_peft_model` on the same
              backbone, modules_to_save=[head]); per client: copy its adapter into the peft
              parameters, build `torch.optim.AdamW`, run its local epochs with a tensor
              batching loop (no DataLoader), copy the trained adapter back. The copies are
              plain `Tensor.copy_` (cheaper than `set_peft_model_state_dict`), so the baseline
              pays no bookkeeping fedhpc avoids only by design.

Both start from the same per-client adapters, and the adapters of the last timed round of each
are compared, so the ratio is between equal work. Timing: one warm-up, then `--repeat` rounds
of each, alternated (cohort, sequential, cohort, ...) so machine load hits both alike; the best
round is reported, the median beside it. Threads and the load average are printed; on a
shared machine the sequential loop (many small multi-threaded ops) suffers more from other
load than the cohort, which inflates the ratio: measure on an idle machine.
Both trainers run in one process under the allocator setting fedhpc's trainer makes
(`keep_freed_memory`: glibc keeps freed activation memory instead of faulting it in again).
`--profile` prints the self CPU time per client of the costliest ops of both (torch.profiler).

Regimes:
  overhead  cross-device simulation: 256 clients x 16 samples, ViT depth 4 width 64 on 32x32
            inputs (64 patches), LoRA r=4 on qkv, batch 16, 1 epoch (one step per client).
            Also a clients_per_pass sweep and the value `probe_clients_per_pass` picks.
            Target: cohort >= 2.5x sequential (stretch 4x; issue 16).
  compute   ViT-tiny (width 192, depth 12, 64 patches), 32 clients x 64 samples, batch 16.
            Target: cohort >= 1.2x. Also a clients_per_pass sweep. Achieved GFLOP/s of both (forward
            + backward FLOPs of one step counted by FlopCounterMode, CPU flash attention
            included) against this machine's fp32 matmul rate (a 4096^3 torch.mm measured in
            the same run, same threads).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedhpc.clients import runnable  # noqa: E402
from fedhpc.models.backbone import build_backbone, build_cohort_model  # noqa: E402
from fedhpc.models.config import LoraConfig, ModelConfig  # noqa: E402
from fedhpc.train.local import (LocalHooks, TrainConfig, client_batches, keep_freed_memory,  # noqa: E402
                                local_train, probe_clients_per_pass, split_passes)
from fedhpc.train.optim import OptimConfig, StackedOptimizer  # noqa: E402

SEED, ROUND, CLASSES = 0, 1, 10


@dataclass(frozen=True, kw_only=True)
class Regime:
    model: dict
    """timm kwargs of `vit_tiny_patch16_224`."""
    clients: int
    samples: int
    """Samples per client."""
    batch: int = 16
    epochs: int = 1
    target: float = 1.0
    """Cohort/sequential clients/s ratio the regime should reach (0: none, for --quick)."""
    sweep: tuple[int, ...] = ()
    """clients_per_pass values to time (overhead regime)."""


REGIMES = {
    "overhead": Regime(model=dict(img_size=32, patch_size=4, depth=4, embed_dim=64, num_heads=4),
                       clients=256, samples=16, target=2.5, sweep=(1, 2, 8, 32, 128, 256)),
    "compute": Regime(model=dict(img_size=32, patch_size=4), clients=32, samples=64, target=1.2, sweep=(2, 8, 32)),
}
QUICK = {  # a CI smoke test: every code path, tiny sizes
    "overhead": replace(REGIMES["overhead"], clients=16, model=dict(img_size=16, patch_size=4, depth=2,
                                                                   embed_dim=32, num_heads=2), sweep=(1, 2, 16),
                        target=0.0),
    "compute": replace(REGIMES["compute"], clients=4, samples=32, model=dict(img_size=16, patch_size=4, depth=2),
                       target=0.0, sweep=(2, 4)),
}
OPTIM = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.01)
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Setup:
    """Data, the starting adapters of every client, and both trainers' models, for one regime."""

    def __init__(self, regime: Regime, device: torch.device, *, precision: str = "fp32", compile: bool = False):
        self.regime, self.device = regime, device
        self.model_cfg = ModelConfig(name="vit_tiny_patch16_224", kwargs=regime.model)
        self.cfg = TrainConfig(local_epochs=regime.epochs, batch_size=regime.batch, optimizer=OPTIM,
                               precision=precision, compile=compile)
        self.cohort = build_cohort_model(self.model_cfg, LORA, num_classes=CLASSES, seed=SEED, device=device)
        g = torch.Generator().manual_seed(SEED)
        size = regime.model["img_size"]
        n = regime.clients * regime.samples
        self.x = torch.randn(n, 3, size, size, generator=g).to(device)
        self.y = torch.randint(0, CLASSES, (n,), generator=g).to(device)
        self.clients = np.arange(regime.clients)
        self.indices = [np.arange(c * regime.samples, (c + 1) * regime.samples) for c in self.clients]
        init = self.cohort.init_adapters(regime.clients, g)
        # distinct clients with nonzero B, as after a few rounds of personalised training
        self.start = {k: (v + 0.02 * torch.randn(v.shape, generator=g)).to(device) for k, v in init.items()}
        self.trainable = list(self.start)
        self.steps = sum(len(client_batches(ix, seed=SEED, client=int(c), round_index=ROUND, cfg=self.cfg))
                         for c, ix in zip(self.clients, self.indices))
        self.peft, self.params = self._peft_model()

    def _peft_model(self):
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        backbone, head, _ = build_backbone(self.model_cfg, num_classes=CLASSES, seed=SEED)
        peft_cfg = PeftLoraConfig(r=LORA.r, lora_alpha=LORA.lora_alpha, target_modules=LORA.target_modules,
                                  modules_to_save=[head])
        model = get_peft_model(backbone, peft_cfg).to(self.device).eval()  # eval: as the cohort backbone
        params = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                key = name.replace("base_model.model.", "").replace(".default", "").replace(".modules_to_save", "")
                params[key.removesuffix(".weight") if ".lora_" in key else key] = p
        if sorted(params) != sorted(self.start):
            raise RuntimeError(f"peft and cohort adapters differ: {sorted(params)} vs {sorted(self.start)}")
        return model, params

    def fresh(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.start.items()}

    # --- (a) fedhpc: cohort passes, as experiment._train_round / clients.train_pass drive local_train ---
    def cohort_round(self, store: dict[str, torch.Tensor], per_pass: int, clients: np.ndarray | None = None) -> int:
        clients = self.clients if clients is None else clients
        optimizer = StackedOptimizer(self.cfg.optimizer)
        passes = 0
        for ids in split_passes(clients, per_pass):
            run_ids = runnable(ids)  # as _train_round: never a one-client pass
            rows = torch.as_tensor(run_ids, device=self.device)
            adapters = {k: v[rows] for k, v in store.items()}
            opt_state = optimizer.init_state(adapters)
            local_train(self.cohort, adapters=adapters, opt_state=opt_state, trainable=self.trainable, x=self.x,
                        y=self.y, client_ids=run_ids, client_indices=[self.indices[c] for c in run_ids], seed=SEED,
                        round_index=ROUND, cfg=self.cfg, hooks=LocalHooks())
            real = torch.as_tensor(ids, device=self.device)
            for k, v in adapters.items():
                store[k][real] = v[:len(ids)]
            passes += 1
        return passes

    # --- (b) the hand-written baseline: one peft model, one client at a time ---
    def sequential_round(self, store: dict[str, torch.Tensor], clients: np.ndarray | None = None) -> None:
        clients = self.clients if clients is None else clients
        cfg, params = self.cfg.optimizer, self.params
        for c in clients:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(store[k][c])
            opt = torch.optim.AdamW(params.values(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                    weight_decay=cfg.weight_decay)
            for rows in client_batches(self.indices[c], seed=SEED, client=int(c), round_index=ROUND, cfg=self.cfg):
                rows = torch.from_numpy(rows).to(self.device)
                opt.zero_grad(set_to_none=True)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"):
                    logits = self.peft(self.x[rows])
                F.cross_entropy(logits.float(), self.y[rows]).backward()
                opt.step()
            with torch.no_grad():
                for k, p in params.items():
                    store[k][c].copy_(p)

    def flops_per_step(self, clients: int) -> tuple[float, float]:
        """Forward + backward FLOPs of one client-step (matmuls and attention, FlopCounterMode):
        (cohort, counted on one step of a `clients`-client pass; sequential, one peft step)."""
        from torch.utils.flop_counter import FlopCounterMode

        rows = torch.arange(clients * self.regime.batch, device=self.device)
        adapters = {k: v[:clients].clone().requires_grad_(True) for k, v in self.start.items()}
        # .backward() rather than local_train's autograd.grad: FlopCounterMode's module hooks
        # reject autograd.grad; the two run the same backward ops.
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
            F.cross_entropy(self.cohort(self.x[rows], adapters), self.y[rows]).backward()
        cohort = counter.get_total_flops() / clients
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
            F.cross_entropy(self.peft(self.x[rows[:self.regime.batch]]), self.y[rows[:self.regime.batch]]).backward()
        self.peft.zero_grad(set_to_none=True)
        return cohort, counter.get_total_flops()


def _attention_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    """Q Kᵀ and P V, as torch counts the CUDA attention kernels."""
    b, h, s, d = q
    return 4 * b * h * s * k[2] * d


def _attention_backward_flops(grad, q, k, v, *args, out_shape=None, **kwargs) -> int:
    """Recomputed Q Kᵀ plus the four gradient products, as torch counts the CUDA kernels."""
    b, h, s, d = q
    return 10 * b * h * s * k[2] * d


# FlopCounterMode knows the CUDA flash/efficient attention ops but not the CPU flash kernel
CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops}


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def alternate(fns: dict, repeat: int, device: torch.device) -> tuple[dict[str, list[float]], dict]:
    """Wall times of `repeat` calls of each function, interleaved so load drifts hit all alike,
    and each function's last result."""
    times, results = {name: [] for name in fns}, {}
    for _ in range(repeat):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            results[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times, results


def matmul_peak(device: torch.device, n: int, repeat: int = 3) -> float:
    """fp32 GFLOP/s of an n x n x n torch.mm, best of `repeat` after a warm-up."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b), device) for _ in range(repeat))
    return 2 * n ** 3 / best / 1e9


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min) {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def describe(name: str, s: Setup) -> None:
    r = s.regime
    m = r.model
    print(f"\n== {name}: {r.clients} clients x {r.samples} samples, batch {r.batch}, {r.epochs} epoch(s), "
          f"{s.steps} client-steps; vit_tiny_patch16_224 img {m['img_size']} patch {m['patch_size']} "
          f"depth {m.get('depth', 12)} width {m.get('embed_dim', 192)} "
          f"({(m['img_size'] // m['patch_size']) ** 2} patches), LoRA r={LORA.r} on {LORA.target_modules} + head")


def compare(s: Setup, per_pass: int, repeat: int) -> tuple[float, float]:
    """Warm-up, then alternated timed rounds; returns best round time (cohort, sequential)."""
    warm = s.clients[:max(2, min(per_pass, len(s.clients)))]
    s.cohort_round(s.fresh(), per_pass, warm)
    s.sequential_round(s.fresh(), warm[:2])

    def cohort():
        store = s.fresh()
        s.cohort_round(store, per_pass)
        return store

    def sequential():
        store = s.fresh()
        s.sequential_round(store)
        return store

    fns = {"cohort": cohort, "sequential": sequential}
    if s.cfg.compile:  # the eager cohort trainer alternated beside it: the compiler's own gain
        def eager():
            compiled, s.cfg = s.cfg, replace(s.cfg, compile=False)
            try:
                return cohort()
            finally:
                s.cfg = compiled

        eager()  # warm-up at the full pass count
        fns["eager"] = eager
    times, out = alternate(fns, repeat, s.device)
    if "eager" in times:
        n = s.regime.clients
        print(f"  eager cohort (same passes)         best {n / min(times['eager']):8.1f} clients/s; compiled / "
              f"eager: {min(times['eager']) / min(times['cohort']):.2f}x best "
              f"({statistics.median(times['eager']) / statistics.median(times['cohort']):.2f}x median)")
    delta = torch.cat([(out["cohort"][k] - out["sequential"][k]).abs().flatten() for k in s.start])
    moved = torch.cat([(out["sequential"][k] - s.start[k]).abs().flatten() for k in s.start])
    print(f"  same work: |cohort - sequential| over all {delta.numel()} trained adapter entries: max "
          f"{delta.max().item():.1e}, {int((delta > 1e-6).sum())} above 1e-6 (median update "
          f"{moved.median().item():.1e}; AdamW's first steps are ~lr·sign(g), so a gradient near 0 turns "
          f"rounding noise into up to lr)")
    n = s.regime.clients
    for name, label in (("cohort", f"cohort (clients_per_pass={per_pass})"), ("sequential", "sequential peft")):
        t = times[name]
        print(f"  {label:34s} best {n / min(t):8.1f} clients/s ({min(t) / n * 1e3:7.2f} ms/client)   "
              f"median {n / statistics.median(t):8.1f} clients/s")
    best = min(times["cohort"]), min(times["sequential"])
    med = [statistics.median(times[k]) for k in ("cohort", "sequential")]
    ratio = best[1] / best[0]
    target = s.regime.target
    verdict = (f"target >= {target:g}x: {'met' if ratio >= target else 'MISSED'}" if target
               else "quick sizes: no target")
    print(f"  ratio cohort/sequential: {ratio:.2f}x best of {repeat} ({med[1] / med[0]:.2f}x median)   ({verdict})")
    return best


def profile_split(s: Setup, per_pass: int, top: int = 8) -> None:
    """Self CPU time per client of the costliest ops, cohort beside sequential (torch.profiler;
    the profiler adds a little to every op, so the sequential column is slightly inflated)."""
    from torch.profiler import ProfilerActivity, profile

    clients = s.clients[:max(2, min(per_pass, len(s.clients)))]
    per_op = {}
    for name, fn in (("cohort", lambda: s.cohort_round(s.fresh(), per_pass, clients)),
                     ("sequential", lambda: s.sequential_round(s.fresh(), clients))):
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        per_op[name] = {e.key: e.self_cpu_time_total / 1e3 / len(clients) for e in prof.key_averages()}
    total = {k: sum(v.values()) for k, v in per_op.items()}
    print(f"  profile, self CPU ms per client ({len(clients)} clients, cohort in one pass):")
    print(f"    {'op':58s} {'cohort':>8s} {'sequential':>10s}")
    names = sorted(per_op["sequential"], key=lambda k: -per_op["sequential"][k])[:top]
    for key in names:
        print(f"    {key[:58]:58s} {per_op['cohort'].get(key, 0.0):8.2f} {per_op['sequential'][key]:10.2f}")
    print(f"    {'everything':58s} {total['cohort']:8.2f} {total['sequential']:10.2f}")


def sweep(s: Setup, pick: int, sequential: float, repeat: int) -> None:
    """Cohort clients/s for each swept clients_per_pass (and the probe's pick) against the sequential round time."""
    regime, device = s.regime, s.device
    print(f"  clients_per_pass sweep (cohort trainer, best of {repeat} after a warm-up round; "
          f"1 = each pass trains the client twice, as _train_round does):")
    rates = {}
    for per_pass in sorted(set(regime.sweep) | {pick}):
        s.cohort_round(s.fresh(), per_pass)
        best = min(timed(lambda: s.cohort_round(s.fresh(), per_pass), device) for _ in range(repeat))
        rates[per_pass] = regime.clients / best
        mark = "   <- probe's pick" if per_pass == pick else ""
        print(f"    clients_per_pass {per_pass:4d}: {rates[per_pass]:8.1f} clients/s "
              f"({rates[per_pass] * sequential / regime.clients:.2f}x sequential){mark}")
    top = max(rates, key=rates.get)
    print(f"  probe's pick reaches {rates[pick] / rates[top]:.0%} of the best swept value ({top})")


def _probe(s: Setup) -> int:
    t0 = time.perf_counter()
    pick = probe_clients_per_pass(s.cohort, sample=s.x[0], batch_size=s.regime.batch, max_clients=s.regime.clients,
                                  trainable=s.trainable, precision=s.cfg.precision)
    print(f"  probe_clients_per_pass picks {pick} (probe took {time.perf_counter() - t0:.2f} s, "
          f"precision {s.cfg.precision}, eager)")
    return pick


def run_overhead(regime: Regime, device: torch.device, repeat: int, profile: bool, opts: dict,
                 do_sweep: bool) -> None:
    s = Setup(regime, device, **opts)
    describe("overhead-bound", s)
    pick = _probe(s)
    _, sequential = compare(s, pick, repeat)
    if profile:
        profile_split(s, pick)
    if do_sweep:
        sweep(s, pick, sequential, min(repeat, 3))


def run_compute(regime: Regime, device: torch.device, repeat: int, quick: bool, profile: bool, opts: dict,
                do_sweep: bool) -> None:
    s = Setup(regime, device, **opts)
    describe("compute-bound", s)
    pick = _probe(s)
    cohort_flops, seq_flops = (f * s.steps / regime.clients for f in s.flops_per_step(max(2, pick)))
    best = compare(s, pick, repeat)
    peak = matmul_peak(device, 1024 if quick else 4096)
    n = regime.clients
    for name, flops, t in (("cohort", cohort_flops, best[0]), ("sequential", seq_flops, best[1])):
        rate = flops * n / t / 1e9
        print(f"  {name:10s} {flops / 1e9:7.2f} GFLOP/client (fwd+bwd, FlopCounterMode)  {rate:7.1f} GFLOP/s "
              f"= {rate / peak:5.1%} of the measured fp32 torch.mm rate")
    print(f"  fp32 torch.mm {1024 if quick else 4096}^3: {peak:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    if profile:
        profile_split(s, pick)
    if do_sweep:
        sweep(s, pick, best[1], 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="cohort trainer vs per-client peft loop: clients/s and ratio")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a CI smoke test (< 60 s)")
    parser.add_argument("--regime", choices=["overhead", "compute", "both"], default="both")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--repeat", type=int, default=0,
                        help="timed rounds of each trainer (0: 5 overhead, 3 compute; quick 2)")
    parser.add_argument("--profile", action="store_true", help="also print where each trainer spends its time")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="both trainers' forward arithmetic (fedhpc: train.precision)")
    parser.add_argument("--compile", action="store_true", help="compile the cohort trainer (train.compile)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the clients_per_pass sweeps")
    parser.add_argument("--clients", type=int, default=0,
                        help="fewer clients than the regime's (0: the regime's), e.g. for the slow bf16 path")
    parser.add_argument("--peers", action="store_true",
                        help="then fedhpc vs the sequential loop vs Flower on the same FedIT rounds (bench/peers.py)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeat = args.repeat or (2 if args.quick else 5)
    regimes = QUICK if args.quick else REGIMES
    if args.clients:
        regimes = {k: replace(r, clients=args.clients, sweep=tuple(c for c in r.sweep if c <= args.clients))
                   for k, r in regimes.items()}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(f"torch {torch.__version__}, device {device.type} (GPU: {gpu}), torch threads {torch.get_num_threads()}, "
          f"{load()}")
    # local_train sets this on its first call anyway; set it before any timing so both trainers
    # (one process) run under the same allocator settings
    kept = keep_freed_memory()
    print(f"allocator: glibc keeps freed memory (no mmap, no trim) for both trainers: {'yes' if kept else 'no'}")
    opts = dict(precision=args.precision, compile=args.compile)
    print(f"precision {args.precision}, cohort compiled: {'yes' if args.compile else 'no'}")
    print(f"timing: 1 warm-up, then alternated rounds of each trainer ({repeat} overhead-bound, "
          f"{args.repeat or (2 if args.quick else 3)} compute-bound); best (median beside)")
    if args.regime in ("overhead", "both"):
        run_overhead(regimes["overhead"], device, repeat, args.profile, opts, not args.no_sweep)
    if args.regime in ("compute", "both"):
        run_compute(regimes["compute"], device, args.repeat or (2 if args.quick else 3), args.quick, args.profile,
                    opts, not args.no_sweep)
    if args.peers:
        try:
            import flwr  # noqa: F401
        except ImportError:
            print("--peers needs flwr[simulation]: python -m venv .venv-bench, a .pth file naming this venv's "
                  "site-packages, .venv-bench/bin/pip install -r requirements-bench.txt (README, Benchmarks)")
            return 2
        import peers
        peers.main(["--precision", args.precision, "--cpus", str(args.threads)])
    print(f"\n{load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Kernel microbenchmarks: each fedhpc.kernels op against its naive baseline, with the ratio.

    python bench/kernel_speed.py [--quick] [--threads N] [--repeat N]      (or: fedhpc bench kernels)

Timing is best-of-N wall clock after one warm-up call (CUDA synchronised), with
torch's intra-op threads set explicitly and printed. Baselines: torch.linalg.qr
(Householder) for orthonormalize, a pairwise Python loop for subspace_similarity,
dense Σ w_k B_k A_k + torch.linalg.svd for lowrank_aggregate, a per-client Python
loop for segment_sum. Slow baselines (seconds) run once, which the output marks.
Aggregation memory is the peak-RSS increase of one call, measured in a fresh
subprocess (VmHWM after resetting it through /proc/self/clear_refs, so imports and
inputs do not count), next to the size of the largest live buffers counted by hand.
CPU targets: orthonormalize >= 2x, similarity >= 50x, aggregation >= 50x. On CUDA the
achieved bandwidth / FLOP rate is also printed against the H100/H200 peaks of
shared/design/kernels_hpc.md §1.0.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedhpc.kernels import lowrank_aggregate, orthonormalize, segment_sum, subspace_similarity  # noqa: E402

PEAKS = {  # kernels_hpc.md §1.0 (NVIDIA datasheet values, dense)
    "H100": dict(bandwidth=3.35e12, fp32=66.9e12, tf32=494.7e12),
    "H200": dict(bandwidth=4.8e12, fp32=66.9e12, tf32=494.7e12),
}
TARGETS = {"orthonormalize": 2.0, "subspace_similarity": 50.0, "lowrank_aggregate": 50.0}

FULL = dict(qr=[(256, 768, 16), (64, 4096, 64)], sim=(500, 768, 16), agg=(4096, 64, 16, 16),
            seg=(64, 1 << 20, 4))
QUICK = dict(qr=[(64, 256, 16), (16, 1024, 32)], sim=(60, 128, 8), agg=(512, 16, 8, 8),
             seg=(16, 1 << 14, 4))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_of(fn, repeat: int, device: torch.device) -> float:
    """Best wall time of ``repeat`` calls after one warm-up call, in seconds."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def once(fn, device: torch.device):
    """(wall time, result) of a single call, for baselines that take seconds."""
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def roofline(device: torch.device, *, nbytes: float = 0.0, flops: float = 0.0, seconds: float,
             precision: str = "fp32") -> str:
    """Achieved rate against the GPU's peak (empty on CPU)."""
    if device.type != "cuda":
        return ""
    name = torch.cuda.get_device_name(device)
    peak = PEAKS["H200" if "H200" in name else "H100"]
    parts = []
    if nbytes:
        parts.append(f"{nbytes / seconds / 1e9:.0f} GB/s = {nbytes / seconds / peak['bandwidth']:.0%} of HBM")
    if flops:
        parts.append(f"{flops / seconds / 1e12:.2f} TFLOP/s = {flops / seconds / peak[precision]:.0%} "
                     f"of {precision} peak")
    return f"   [{name}: {'; '.join(parts)}]"


def report(op: str, shape: str, ours: float, base: float, base_runs: int, extra: str = "", *,
           targets: bool = True) -> float:
    """One result line; the target verdict only for the full shapes the targets are stated for."""
    ratio = base / ours
    target = TARGETS.get(op) if targets else None
    verdict = "" if target is None else (" (target >= %gx: %s)" % (target, "met" if ratio >= target else "MISSED"))
    note = "" if base_runs > 1 else " [baseline: single run]"
    print(f"{op:20s} {shape:28s} ours {ours * 1e3:9.2f} ms  baseline {base * 1e3:10.2f} ms  "
          f"ratio {ratio:7.1f}x{verdict}{note}{extra}")
    return ratio


def bench_orthonormalize(shapes, repeat: int, device: torch.device, targets: bool) -> None:
    for b, d, r in shapes:
        X = torch.randn(b, d, r, device=device)
        ours = best_of(lambda: orthonormalize(X), repeat, device)
        base = best_of(lambda: torch.linalg.qr(X), repeat, device)
        Q = orthonormalize(X)[0]
        err = (Q.mT @ Q - torch.eye(r, device=device)).abs().max().item()
        report("orthonormalize", f"[{b}, {d}, {r}] fp32", ours, base, repeat,
               f"  max|QᵀQ-I| {err:.1e}" + roofline(device, nbytes=8 * b * d * r, seconds=ours), targets=targets)


def pairwise_loop(U: torch.Tensor) -> torch.Tensor:
    """The naive baseline: one r x r product and norm per pair."""
    n, r = U.shape[0], U.shape[2]
    S = torch.empty(n, n, device=U.device)
    for i in range(n):
        for j in range(n):
            S[i, j] = (U[i].T @ U[j]).square().sum() / r
    return S


def bench_similarity(shape, repeat: int, device: torch.device, targets: bool) -> None:
    n, d, r = shape
    U = orthonormalize(torch.randn(n, d, r, device=device))[0]
    ours = best_of(lambda: subspace_similarity(U), repeat, device)
    base, S_loop = once(lambda: pairwise_loop(U), device)
    err = (subspace_similarity(U) - S_loop).abs().max().item()
    flops = d * (n * r) ** 2  # symmetric half of the Gram, 2 flops per multiply-add
    report("subspace_similarity", f"N={n} d={d} r={r} fp32", ours, base, 1,
           f"  max|ΔS| {err:.1e}  {flops / ours / 1e9:.0f} GFLOP/s" + roofline(device, flops=flops, seconds=ours),
           targets=targets)


def aggregation_inputs(d: int, K: int, r: int, rank: int, device: torch.device, noise: float = 3.0):
    """LoRA-like clients: a shared rank-`rank` update plus client noise (σ_17/σ_16 ≈ 0.24 at d=4096).

    Pure Gaussian factors would give a flat spectrum whose top-k subspace is not
    well defined, which no truncated SVD can reproduce stably.
    """
    gen = torch.Generator(device=device).manual_seed(0)
    shared_B = torch.randn(d, rank, generator=gen, device=device)
    shared_A = torch.linspace(3, 1, rank, device=device)[:, None] * torch.randn(rank, d, generator=gen, device=device)
    B = noise * torch.randn(K, d, r, generator=gen, device=device)
    A = noise * torch.randn(K, r, d, generator=gen, device=device)
    k = min(r, rank)
    B[:, :, :k] += shared_B[:, :k]
    A[:, :k] += shared_A[:k]
    w = torch.rand(K, generator=gen, device=device) + 0.5
    return B / d ** 0.5, A / d ** 0.5, w / w.sum()


def dense_aggregate(B, A, w, rank: int):
    """The naive baseline: form M = Σ w_k B_k A_k, full SVD, truncate."""
    M = torch.einsum("k,kor,kri->oi", w, B, A)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :rank], S[:rank], Vh[:rank]


def peak_rss_delta(case: str, d: int, K: int, r: int, rank: int, threads: int) -> float | None:
    """Peak-RSS increase (bytes) of one aggregation call, measured in a fresh subprocess."""
    spec = json.dumps(dict(case=case, d=d, K=K, r=r, rank=rank, threads=threads))
    proc = subprocess.run([sys.executable, __file__, "--peak-rss", spec], capture_output=True, text=True)
    return float(proc.stdout.split()[-1]) if proc.returncode == 0 and proc.stdout.strip() else None


def _measure_peak_rss(spec: str) -> None:
    """Child side of peak_rss_delta: warm up, reset the high-water mark, run once, print the delta."""
    args = json.loads(spec)
    torch.set_num_threads(args["threads"])
    B, A, w = aggregation_inputs(args["d"], args["K"], args["r"], args["rank"], torch.device("cpu"))
    run = {"dense": lambda: dense_aggregate(B, A, w, args["rank"]),
           "exact": lambda: lowrank_aggregate(B, A, w, rank=args["rank"], method="exact"),
           "auto": lambda: lowrank_aggregate(B, A, w, rank=args["rank"])}[args["case"]]
    run()

    def status(key: str) -> int:
        return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    run()
    print(status("VmHWM") - before)


def bench_aggregation(shape, repeat: int, device: torch.device, threads: int, targets: bool) -> None:
    d, K, r, rank = shape
    B, A, w = aggregation_inputs(d, K, r, rank, device)
    R = K * r
    dense, (U0, S0, _) = once(lambda: dense_aggregate(B, A, w, rank), device)
    for method in ("auto", "exact"):  # the target is for the default (auto); exact is for reference
        ours = best_of(lambda: lowrank_aggregate(B, A, w, rank=rank, method=method), repeat, device)
        U, S, _ = lowrank_aggregate(B, A, w, rank=rank, method=method)
        s_err = ((S - S0).abs().max() / S0[0]).item()
        gap = torch.linalg.matrix_norm(U @ U.T - U0 @ U0.T, ord=2).item()
        report("lowrank_aggregate", f"d={d} K={K} r={r} k={rank} {method}", ours, dense, 1,
               f"  σ err {s_err:.1e}  ‖ΔP_U‖₂ {gap:.1e}", targets=targets and method == "auto")
    if targets and device.type == "cpu" and Path("/proc/self/clear_refs").exists():
        mib, sketch = 2.0 ** 20, 2 * rank + max(rank, 16)
        estimate = {"dense": 3 * d * d * 4, "exact": 5 * d * R * 4 + 3 * R * R * 8,
                    "auto": d * R * 4 + 4 * d * sketch * 4}
        what = {"dense": "M, U, Vh: 3·d²·4 B, + LAPACK workspace",
                "exact": "Bw, Q₁ and Q of both factors: ≤ 5·d·R·4 B; cores: 3·R²·8 B",
                "auto": "Bw: d·R·4 B; sketches: 4·d·l·4 B"}
        for case in ("dense", "exact", "auto"):
            peak = peak_rss_delta(case, d, K, r, rank, threads)
            measured = "n/a" if peak is None else f"{peak / mib:8.1f} MiB"
            print(f"{'  peak RSS delta':20s} {case:28s} {measured}   buffers {estimate[case] / mib:8.1f} MiB "
                  f"({what[case]})")


def bench_segment_sum(shape, repeat: int, device: torch.device) -> None:
    C, F, G = shape
    values = torch.randn(C, F, device=device)
    ids = torch.arange(C, device=device) % G
    w = torch.rand(C, device=device)

    def loop():
        out = torch.zeros(G, F, dtype=torch.float64, device=device)
        for c in range(C):
            out[int(ids[c])] += float(w[c]) * values[c].double()
        return out

    ours = best_of(lambda: segment_sum(values, ids, w, G), repeat, device)
    base = best_of(loop, repeat, device)
    nbytes = C * F * 4 + G * F * 8
    report("segment_sum", f"C={C} F={F} G={G} fp32->fp64", ours, base, repeat,
           roofline(device, nbytes=nbytes, seconds=ours))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fedhpc kernel microbenchmarks (ratios vs naive baselines)")
    parser.add_argument("--quick", action="store_true", help="small shapes for a CI smoke test (< 30 s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per fast measurement (best is kept)")
    parser.add_argument("--peak-rss", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak_rss:
        _measure_peak_rss(args.peak_rss)
        return 0
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = QUICK if args.quick else FULL
    repeat = 2 if args.quick else args.repeat
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(f"torch {torch.__version__}, device {device.type} (GPU: {gpu}), torch threads {torch.get_num_threads()}, "
          f"best of {repeat} after 1 warm-up, backend {os.environ.get('FEDHPC_KERNELS') or 'auto'}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    full = not args.quick  # targets and the memory measurement are for the full shapes only
    bench_orthonormalize(shapes["qr"], repeat, device, full)
    bench_similarity(shapes["sim"], repeat, device, full)
    bench_aggregation(shapes["agg"], repeat, device, args.threads, full)
    bench_segment_sum(shapes["seg"], repeat, device)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

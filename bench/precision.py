"""bf16 against fp32 for one cohort training step, per regime of bench/throughput.py.

    python bench/precision.py [--regime overhead|compute|both] [--clients 4] [--repeat 3]

One `local_train` step (forward, backward, AdamW) of a `--clients`-client pass, in
`train.precision=fp32` and `bf16`, alternated after a warm-up; best of `--repeat`. It exists
because on a CPU without native bf16 arithmetic a whole bf16 round of the compute regime takes
many minutes; the step is what a round repeats. Also: the measured torch.mm rate of both dtypes
at a shape of the regime's qkv layer, which says whether the CPU has bf16 matmul hardware.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import REGIMES, Setup, load  # noqa: E402

from fedhpc.train.local import LocalHooks, local_train  # noqa: E402
from fedhpc.train.optim import StackedOptimizer  # noqa: E402


def step_seconds(s: Setup, clients: int, precision: str) -> float:
    cfg = replace(s.cfg, precision=precision, local_epochs=1, local_steps=1)
    ids = np.arange(clients)
    adapters = {k: v[:clients].clone() for k, v in s.start.items()}
    state = StackedOptimizer(cfg.optimizer).init_state(adapters)
    t0 = time.perf_counter()
    local_train(s.cohort, adapters=adapters, opt_state=state, trainable=s.trainable, x=s.x, y=s.y, client_ids=ids,
                client_indices=[s.indices[c] for c in ids], seed=0, round_index=1, cfg=cfg, hooks=LocalHooks())
    return time.perf_counter() - t0


def mm_rate(rows: int, d_in: int, d_out: int, dtype, repeat: int = 5) -> float:
    a, b = torch.randn(rows, d_in, dtype=dtype), torch.randn(d_in, d_out, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeat))
    return 2 * rows * d_in * d_out / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regime", choices=["overhead", "compute", "both"], default="both")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} thread(s), {load()}")
    for name in (["overhead", "compute"] if args.regime == "both" else [args.regime]):
        regime = replace(REGIMES[name], clients=args.clients)
        s = Setup(regime, torch.device("cpu"))
        width = regime.model.get("embed_dim", 192)
        rows = args.clients * regime.batch * ((regime.model["img_size"] // regime.model["patch_size"]) ** 2 + 1)
        rates = {str(dt).removeprefix("torch."): mm_rate(rows, width, 3 * width, dt)
                 for dt in (torch.float32, torch.bfloat16)}
        times = {"fp32": [], "bf16": []}
        for p in times:
            step_seconds(s, args.clients, p)  # warm-up
        for _ in range(args.repeat):
            for p in times:
                times[p].append(step_seconds(s, args.clients, p))
        fp32, bf16 = min(times["fp32"]), min(times["bf16"])
        print(f"== {name}: one local step of a {args.clients}-client pass (best of {args.repeat}): fp32 "
              f"{fp32 * 1e3:.0f} ms, bf16 {bf16 * 1e3:.0f} ms: bf16 speed-up {fp32 / bf16:.2f}x")
        print(f"   torch.mm [{rows} x {width}] @ [{width} x {3 * width}] (the qkv layer's shape): " +
              ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in rates.items()))
    print(load())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What `store.dtype: bfloat16` does to accuracy (docs/results.md, "Scale"): FedSA-LoRA with kept
AdamW state on the quickstart's planted data, the client store in float32 and in bfloat16.

    OMP_NUM_THREADS=1 python bench/bf16_store.py --seeds 0 1 2 --rounds 5 --out runs/bf16

Every run is configs/quickstart.yaml (32 clients in 4 planted clusters, 4 unseen; the depth-4 ViT),
strategy fedsa_lora with `keep_optimizer_state: true` (the kept rows are B, the head and AdamW's
moments: everything bfloat16 rounds). Nothing was tuned. With bfloat16 the store is a PagedStore
(make_store), which rounds every row at put; float32 keeps the in-memory store (bit-identical to a
float32 PagedStore: tests/test_scale.py). Prints per-seed results, mean ± std, and the paired
difference bfloat16 - float32; writes every summary to <out>/results.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from mpi4py import MPI

from fedhpc.config import load_config
from fedhpc.experiment import run

REPO = Path(__file__).resolve().parent.parent
METRICS = ("personalized_mean", "global_accuracy", "unseen_accuracy", "unseen_accuracy_finetuned")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="runs/bf16")
    args = parser.parse_args()
    results = {}
    for seed in args.seeds:
        for dtype in ("float32", "bfloat16"):
            name = f"bf16_{dtype}_s{seed}"
            cfg = load_config(REPO / "configs/quickstart.yaml",
                              [f"seed={seed}", f"rounds={args.rounds}", f"name={name}", f"out_dir={args.out}",
                               "strategy.name=fedsa_lora", "strategy.keep_optimizer_state=true",
                               f"store.dtype={dtype}", "checkpoint.every=0"])
            summary = run(cfg, comm=MPI.COMM_WORLD, progress=False)
            results[name] = summary
            print(name, {k: summary.get(k) for k in METRICS}, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print("\n| metric | float32 | bfloat16 | bfloat16 - float32 (paired) |\n|---|---|---|---|")
    for metric in METRICS:
        rows = {d: np.array([float(results[f"bf16_{d}_s{s}"].get(metric, np.nan)) for s in args.seeds], dtype=float)
                for d in ("float32", "bfloat16")}
        if np.isnan(rows["float32"]).all():
            continue
        diff = rows["bfloat16"] - rows["float32"]
        cell = lambda a: f"{np.mean(a):.4f} ± {np.std(a, ddof=1) if len(a) > 1 else 0:.4f}"
        print(f"| {metric} | {cell(rows['float32'])} | {cell(rows['bfloat16'])} | {cell(diff)} |")


if __name__ == "__main__":
    main()

"""Fed-HeLLo vs FedRA vs Exclusive (and FedIT) on the planted benchmark of configs/fedhello.yaml.

    python bench/fedhello.py --out runs/fedhello_bench            # tune, then report (~30 CPU-minutes)

1. Tuning: each method's learning rate from one grid, on the tuning seed(s) only (final global
   accuracy); the Fed-HeLLo variants share the rate tuned for Fed-HeLLo (bottleneck + FIM).
2. Report: every variant at its tuned rate on the reported seeds (disjoint from the tuning seeds),
   mean ± sample std of the final and the best evaluated global accuracy; the FIM scores of the last FIM
   round (planted blocks 4, 5, and a control with the teacher planted in blocks 0, 1); the
   mismatched prior (triangle) with and without FIM; bytes and optimizer state per client.
One process at a time, OMP_NUM_THREADS=1; a run whose summary exists is not run again.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from fedhpc.sweep import mean_std

CONFIG = "configs/fedhello.yaml"
GROUPS = "groups: {fractions: [1, 1, 1], budgets: [3, 5, 6]}"
HELLO = f"name: fedhello, {GROUPS}, aggregate_head: true, fim_start: 6, fim_every: 5, fim_samples: 50"
METHODS = {  # label: (strategy subtree, extra overrides, which tuned rate it uses)
    "Fed-HeLLo (bottleneck + FIM)": (f"{{{HELLO}, allocation: fim, pattern: bottleneck}}", [], "fedhello"),
    "Fed-HeLLo (bottleneck, RGD only)": (f"{{{HELLO}, allocation: random, pattern: bottleneck}}", [], "fedhello"),
    "FedRA": (f"{{name: fedra, {GROUPS}, aggregate_head: true}}", [], "fedra"),
    "Exclusive": (f"{{name: exclusive, {GROUPS}, aggregate_head: true}}", [], "exclusive"),
    "FedIT (every client, every layer)": ("{name: fedit}", [], "fedit"),
    "Fed-HeLLo (triangle, RGD only)": (f"{{{HELLO}, allocation: random, pattern: triangle}}", [], "fedhello"),
    "Fed-HeLLo (triangle + FIM)": (f"{{{HELLO}, allocation: fim, pattern: triangle}}", [], "fedhello"),
    "control: bottleneck + FIM, teacher in blocks 0, 1": (
        f"{{{HELLO}, allocation: fim, pattern: bottleneck}}", ["data.planted.teacher_blocks=[0, 1]"], "fedhello"),
}
TUNED = {"fedhello": "Fed-HeLLo (bottleneck + FIM)", "fedra": "FedRA", "exclusive": "Exclusive",
         "fedit": "FedIT (every client, every layer)"}


def run(out: Path, name: str, strategy: str, extra: list[str], seed: int, lr: float) -> dict:
    """One run (skipped if its summary exists): its summary and evaluated rounds."""
    folder = out / name
    if not (folder / "summary.json").exists():
        cmd = [sys.executable, "-m", "fedhpc.cli", "run", CONFIG, f"out_dir={out}", f"name={name}", f"seed={seed}",
               f"strategy={strategy}", f"train.optimizer.lr={lr}", "checkpoint.every=0", "--quiet", *extra]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {"summary": json.loads((folder / "summary.json").read_text()), "metrics": metrics}


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/fedhello_bench")
    parser.add_argument("--tune-seeds", type=int, nargs="+", default=[100])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--grid", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1])
    args = parser.parse_args()
    out = Path(args.out)
    assert not set(args.tune_seeds) & set(args.seeds), "tuning seeds must be apart from reported seeds"

    # --- 1. learning rate per method, on the tuning seeds --------------------------------------------
    print("Tuning (final global accuracy, mean over tuning seeds " + ", ".join(map(str, args.tune_seeds)) + ")\n")
    print("| method | " + " | ".join(f"lr {lr:g}" for lr in args.grid) + " | chosen |")
    print("|---|" + "---|" * (len(args.grid) + 1))
    chosen = {}
    for key, label in TUNED.items():
        strategy, extra, _ = METHODS[label]
        acc = [np.mean([run(out, f"tune_{key}_lr{lr:g}_s{s}", strategy, extra, s, lr)["summary"]["global_accuracy"]
                        for s in args.tune_seeds]) for lr in args.grid]
        chosen[key] = args.grid[int(np.argmax(acc))]
        print(f"| {label} | " + " | ".join(f"{a:.3f}" for a in acc) + f" | {chosen[key]:g} |", flush=True)

    # --- 2. every variant at its tuned rate on the reported seeds ------------------------------------
    results = {}
    for label, (strategy, extra, key) in METHODS.items():
        lr = chosen[key]
        results[label] = [run(out, f"{slug(label)}_lr{lr:g}_s{s}", strategy, extra, s, lr) for s in args.seeds]
    print(f"\nReported seeds {', '.join(map(str, args.seeds))} (mean ± std over seeds)\n")
    print("| method | lr | final global acc | best evaluated global acc | MB up per round | rounds with FIM |")
    print("|---|---|---|---|---|---|")
    for label, runs in results.items():
        final = [r["summary"]["global_accuracy"] for r in runs]
        best = [max(m["global_accuracy"] for m in r["metrics"] if "global_accuracy" in m) for r in runs]
        up = [r["summary"]["bytes_up"] / r["summary"]["rounds"] / 1e6 for r in runs]
        fim = sorted({m["fim_round"] for r in runs for m in r["metrics"] if m.get("fim_round")})
        print(f"| {label} | {chosen[METHODS[label][2]]:g} | {mean_std(final)} | {mean_std(best)} | {np.mean(up):.4f} "
              f"| {', '.join(map(str, fim)) or '-'} |", flush=True)

    print("\nFIM scores s_l of the last FIM round (round 16), per seed; blocks sorted by score, highest first\n")
    print("| run | seed | s_0 .. s_5 | blocks by score | p_l x 27 |")
    print("|---|---|---|---|---|")
    for label in ("Fed-HeLLo (bottleneck + FIM)", "Fed-HeLLo (triangle + FIM)",
                  "control: bottleneck + FIM, teacher in blocks 0, 1"):
        for seed, r in zip(args.seeds, results[label]):
            scores, probs = np.array(r["summary"]["fim_scores"]), np.array(r["summary"]["fim_probs"])
            print(f"| {label} | {seed} | {', '.join(f'{v:.3g}' for v in scores)} "
                  f"| {', '.join(map(str, np.argsort(-scores, kind='stable')))} "
                  f"| {', '.join(f'{27 * p:.2f}' for p in probs)} |")

    print("\nPer client and round: modelled upload and AdamW state (2 moments, float32) by resource group\n")
    print(client_costs())
    (out / "results.json").write_text(json.dumps({"chosen_lr": chosen, "seeds": args.seeds,
                                                  "tune_seeds": args.tune_seeds}, indent=1))


def client_costs() -> str:
    """Upload and optimizer state per client from the model's adapter shapes (configs/fedhello.yaml)."""
    from mpi4py import MPI

    from fedhpc.assemble import assemble
    from fedhpc.config import load_config

    r = assemble(load_config(CONFIG, ["strategy.allocation=random", "strategy.aggregate_head=true"]), MPI.COMM_SELF)
    s = r.strategy
    layer = [sum(int(np.prod(s.shapes[k])) for k in keys) for keys in s.layer_keys]
    head = sum(int(np.prod(s.shapes[k])) for k in s.head_keys)
    lines = ["| client | layers trained | LoRA vs FedIT | upload (floats, head incl.) | upload vs FedIT "
             "| AdamW state (floats) | vs FedIT |", "|---|---|---|---|---|---|---|"]
    full_up, full_opt = sum(layer) + head, 2 * (sum(layer) + head)
    for budget in sorted(set(s.budget.tolist())):
        up = budget * layer[0] + head   # every block has the same size here
        lines.append(f"| budget {budget} | {budget} of {len(layer)} | {budget / len(layer):.2f} | {up} "
                     f"| {up / full_up:.2f} | {2 * up} | {2 * up / full_opt:.2f} |")
    lines.append(f"| FedIT | {len(layer)} of {len(layer)} | 1.00 | {full_up} | 1.00 | {full_opt} | 1.00 |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

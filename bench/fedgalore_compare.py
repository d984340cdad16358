"""FedGaLore's variants against full fine-tuning and federated LoRA under label skew, over seeds.

    # 1. tune: each method's lr from the grid on the tuning seeds (label skew 0.1)
    OMP_NUM_THREADS=1 python bench/fedgalore_compare.py tune --out runs/fedgalore_bench
    # 2. report: each method at its tuned lr on the reported seeds, label skew 0.1 and 0.5
    OMP_NUM_THREADS=1 python bench/fedgalore_compare.py report --out runs/fedgalore_bench
    # 3. the tables (markdown, mean ± std over the reported seeds)
    python bench/fedgalore_compare.py table --out runs/fedgalore_bench

Every run is configs/fedgalore.yaml (a planted teacher with a full-rank update of every adapted
matrix, Dirichlet label skew) plus the method's overrides, run in this process on one rank. Each
finished run appends one JSON line to <out>/results.jsonl; a rerun skips what is there.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from fedhpc.config import load_config
from fedhpc.experiment import run

CONFIG = "configs/fedgalore.yaml"
METHODS = {
    "fedgalore S2 (AJIVE)": ["strategy.name=fedgalore", "strategy.sync=s2"],
    "fedgalore S1 (mean V, shared P)": ["strategy.name=fedgalore", "strategy.sync=s1"],
    "fedgalore S0 (no sync)": ["strategy.name=fedgalore", "strategy.sync=s0"],
    "fedavg_full": ["strategy.name=fedavg_full"],
    "fedit": ["strategy.name=fedit"],
    "ffa_lora": ["strategy.name=ffa_lora"],
    "fedsa_lora": ["strategy.name=fedsa_lora"],
    "fedex_lora": ["strategy.name=fedex_lora"],
}
LR_GRID = (0.001, 0.003, 0.01, 0.03)
TUNING_SEEDS, TUNING_SKEW = (100, 101), 0.1
REPORTED_SEEDS, REPORTED_SKEWS = (0, 1, 2), (0.1, 0.5)
FIELDS = ("global_accuracy", "personalized_mean", "final_train_loss", "bytes_up", "bytes_down", "joint_rank")


def _key(method: str, seed: int, skew: float, lr: float) -> str:
    return f"{method}|{seed}|{skew}|{lr}"


def _done(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {_key(r["method"], r["seed"], r["skew"], r["lr"]): r for r in rows}


def _run(out: Path, method: str, seed: int, skew: float, lr: float) -> dict:
    name = f"{abs(hash(_key(method, seed, skew, lr))):x}"
    overrides = [*METHODS[method], f"seed={seed}", f"data.planted.label_skew={skew}", f"train.optimizer.lr={lr}",
                 f"out_dir={out / 'runs'}", f"name={name}"]
    t0 = time.process_time()
    summary = run(load_config(CONFIG, overrides), comm=MPI.COMM_SELF, progress=False)
    row = {"method": method, "seed": seed, "skew": skew, "lr": lr, "cpu_seconds": time.process_time() - t0,
           "rounds": summary["rounds"], **{k: summary.get(k) for k in FIELDS}}
    print(json.dumps(row), flush=True)
    return row


def _sweep(out: Path, jobs: list[tuple[str, int, float, float]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = _done(results)
    for job in jobs:
        if _key(*job) in done:
            continue
        row = _run(out, *job)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")


def _score(row: dict) -> float:
    """What tuning maximises: global accuracy, or personalized accuracy for a method without a global
    model (fedsa_lora keeps B private)."""
    value = row["global_accuracy"]
    return row["personalized_mean"] if value is None or math.isnan(value) else value


def tuned_lrs(out: Path) -> dict[str, float]:
    """Each method's lr with the best mean score over the tuning seeds (ties: the smaller lr)."""
    done = _done(out / "results.jsonl")
    best = {}
    for method in METHODS:
        scores = {lr: np.mean([_score(done[_key(method, s, TUNING_SKEW, lr)]) for s in TUNING_SEEDS])
                  for lr in LR_GRID if all(_key(method, s, TUNING_SKEW, lr) in done for s in TUNING_SEEDS)}
        if scores:
            best[method] = max(sorted(scores), key=lambda lr: scores[lr])
    return best


def _fmt(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    v = np.asarray([math.nan if x is None else x for x in values], dtype=float) * scale
    if np.isnan(v).any():
        return "—"  # no such metric (fedsa_lora has no global model)
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1) if len(v) > 1 else math.nan:.{digits}f}"


def table(out: Path) -> str:
    done = _done(out / "results.jsonl")
    lrs = tuned_lrs(out)
    lines = ["Tuning (global accuracy, personalized for fedsa_lora; mean over seeds "
             + ", ".join(map(str, TUNING_SEEDS)) + f", label skew {TUNING_SKEW}):", "",
             "| method | " + " | ".join(f"lr {lr:g}" for lr in LR_GRID) + " | chosen |",
             "|---|" + "---:|" * (len(LR_GRID) + 1)]
    for method in METHODS:
        cells = []
        for lr in LR_GRID:
            rows = [done.get(_key(method, s, TUNING_SKEW, lr)) for s in TUNING_SEEDS]
            cells.append(f"{np.mean([_score(r) for r in rows]):.3f}" if all(rows) else "")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {lrs.get(method, '')} |")
    lines += ["", f"Reported (seeds {', '.join(map(str, REPORTED_SEEDS))}, each method at its tuned lr; "
              "mean ± std over seeds; bytes per participating client per round):", "",
              "| method | lr | " + " | ".join(f"global acc. (skew {a})" for a in REPORTED_SKEWS) + " | "
              + " | ".join(f"personalized (skew {a})" for a in REPORTED_SKEWS) + " | kB up | kB down | CPU s/run |",
              "|---|---:|" + "---:|" * (2 * len(REPORTED_SKEWS) + 3)]
    for method, lr in lrs.items():
        rows = {a: [done.get(_key(method, s, a, lr)) for s in REPORTED_SEEDS] for a in REPORTED_SKEWS}
        if not all(all(r) for r in rows.values()):
            continue
        every = [r for rs in rows.values() for r in rs]
        cfg = load_config(CONFIG, METHODS[method])
        participants = cfg.num_clients * (1 - cfg.data.unseen_fraction) * cfg.sampling.fraction
        per_round = lambda key: np.mean([r[key] / r["rounds"] / participants for r in every]) / 1e3  # noqa: E731
        lines.append(f"| {method} | {lr:g} | "
                     + " | ".join(_fmt([r["global_accuracy"] for r in rows[a]]) for a in REPORTED_SKEWS) + " | "
                     + " | ".join(_fmt([r["personalized_mean"] for r in rows[a]]) for a in REPORTED_SKEWS)
                     + f" | {per_round('bytes_up'):.1f} | {per_round('bytes_down'):.1f}"
                     + f" | {np.mean([r['cpu_seconds'] for r in every]):.1f} |")
    lines += ["", "Paired differences of global accuracy (per seed, then mean ± std over seeds):", "",
              "| difference | " + " | ".join(f"skew {a}" for a in REPORTED_SKEWS) + " |",
              "|---|" + "---:|" * len(REPORTED_SKEWS)]
    pairs = [(a, "fedavg_full") for a in lrs if a != "fedavg_full"]
    pairs += [("fedgalore S2 (AJIVE)", "fedgalore S0 (no sync)"), ("fedgalore S2 (AJIVE)", "fedgalore S1 (mean V, shared P)"),
              ("fedgalore S1 (mean V, shared P)", "fedgalore S0 (no sync)"), ("fedgalore S2 (AJIVE)", "fedit")]
    for a, b in pairs:
        if a not in lrs or b not in lrs:
            continue
        cells = []
        for skew in REPORTED_SKEWS:
            got = [(done.get(_key(a, s, skew, lrs[a])), done.get(_key(b, s, skew, lrs[b]))) for s in REPORTED_SEEDS]
            if not all(x and y for x, y in got) or any(x["global_accuracy"] is None or math.isnan(x["global_accuracy"])
                                                       for x, _ in got):
                cells.append("")
                continue
            cells.append(_fmt([x["global_accuracy"] - y["global_accuracy"] for x, y in got]))
        if any(cells):
            lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["tune", "report", "table"])
    parser.add_argument("--out", type=Path, default=Path("runs/fedgalore_bench"))
    parser.add_argument("--methods", nargs="*", default=list(METHODS), help="subset of the methods (default: all)")
    args = parser.parse_args()
    if args.phase == "tune":
        _sweep(args.out, [(m, s, TUNING_SKEW, lr) for m in args.methods for lr in LR_GRID for s in TUNING_SEEDS])
    elif args.phase == "report":
        lrs = tuned_lrs(args.out)
        missing = [m for m in args.methods if m not in lrs]
        if missing:
            raise SystemExit(f"no tuned lr for {missing}: run the tune phase first")
        _sweep(args.out, [(m, s, a, lrs[m]) for m in args.methods for a in REPORTED_SKEWS for s in REPORTED_SEEDS])
    print(table(args.out))


if __name__ == "__main__":
    main()

"""Accuracy under client faults (docs/results.md, "Client faults"): FedIT, FedSA-LoRA and HiLoRA on
the quickstart's planted data, against the dropout rate and against the straggler policy.

    OMP_NUM_THREADS=1 python bench/faults_accuracy.py --seeds 0 1 --rounds 8 --out runs/faults

Every run is configs/quickstart.yaml (32 clients in 4 planted clusters, 4 unseen; the depth-4 ViT)
with `rounds` rounds and the method's options below; no option was tuned for this table. Prints
markdown tables of mean ± sample std over the seeds (global accuracy where the method has a global model,
personalized mean accuracy) and writes every summary to <out>/results.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from fedhpc.config import load_config
from fedhpc.experiment import run
from fedhpc.sweep import mean_std

REPO = Path(__file__).resolve().parent.parent
METHODS = {
    "fedit": [],
    "fedsa_lora": [],
    # HiLoRA's stages fitted to the shorter run; its clustering as in configs/hilora.yaml
    "hilora": ["strategy.root_rounds=3", "strategy.cluster_rounds=4", "strategy.leaf_lr_scale=0.1",
               "strategy.basis_source=update_product", "strategy.similarity=cosine", "strategy.sigma_scale=0.35"],
}
DROPOUT = (0.0, 0.1, 0.3, 0.5)
POLICIES = ("drop", "partial")  # "wait" trains late clients fully: the numbers of dropout 0 (tested)


def settings():
    for p in DROPOUT:
        yield f"dropout {p}", [f"faults.dropout={p}"]
    for policy in POLICIES:
        yield f"stragglers 0.5, {policy}", ["faults.stragglers=0.5", f"faults.policy={policy}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--out", default="runs/faults")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, t0 = [], time.perf_counter()
    for method in args.methods:
        for label, faults in settings():
            for seed in args.seeds:
                cfg = load_config(REPO / "configs/quickstart.yaml", [
                    f"strategy.name={method}", *METHODS[method], *faults, f"rounds={args.rounds}", f"seed={seed}",
                    f"out_dir={out}", f"name={method}-{label.replace(' ', '').replace(',', '-')}-s{seed}",
                    "checkpoint.every=0"])
                summary = run(cfg, comm=MPI.COMM_SELF, progress=False)
                lines = [json.loads(x) for x in (out / cfg.name / "metrics.jsonl").read_text().splitlines()]
                results.append({"method": method, "setting": label, "seed": seed,
                                "global": summary["global_accuracy"], "personalized": summary["personalized_mean"],
                                "returned": sum(m.get("returned", m["participants"]) for m in lines),
                                "participants": sum(m["participants"] for m in lines),
                                "bytes_up": summary["bytes_up"]})
                print(json.dumps(results[-1]), f"({time.perf_counter() - t0:.0f} s)", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    for metric in ("global", "personalized"):
        print(f"\n{metric} accuracy, mean ± std over seeds {args.seeds}\n")
        print("| setting | " + " | ".join(args.methods) + " |")
        print("|---|" + "---|" * len(args.methods))
        for label, _ in settings():
            cells = []
            for method in args.methods:
                cells.append(mean_std([r[metric] for r in results if r["method"] == method and r["setting"] == label]))
            print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"\n{len(results)} runs in {time.perf_counter() - t0:.0f} s")



if __name__ == "__main__":
    main()

"""Markdown tables for docs/results.md ("HiLoRA") from run directories' summary.json and metrics.jsonl.

    python bench/hilora_table.py RUN_DIR...        # e.g. runs/hilora_s10 runs/hilora_s11 runs/fedit_s10 ...

What `fedhpc report` does not show for HiLoRA: one row per method, mean ± std over its seeds
(runs named `<method>_s<seed>` are one method), with the clustering ARI and the MPI bytes per
rank per round; then for HiLoRA methods the personalized mean at the end of each stage (the tier
ablation) and the MPI bytes per rank per round in each stage.
"""
from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

STAGE_LABELS = {"root": "root", "cluster": "root + cluster", "leaf": "root + cluster + leaf"}


def _stat(values: list[float | None], digits: int = 3) -> str:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def _load(path: str) -> tuple[dict, list[dict]]:
    run = Path(path)
    summary = json.loads((run / "summary.json").read_text())
    return summary, [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _stage_ends(rounds: list[dict], ranks: int) -> dict[str, tuple[dict, float]]:
    """Per stage trained: (metrics of its last round, MPI bytes per rank per round in it)."""
    trained = ["root"] + [m["next_stage"] for m in rounds[:-1]]  # the stage each round trained
    out = {}
    for stage in STAGE_LABELS:
        idx = [i for i, t in enumerate(trained) if t == stage]
        if idx:
            before = rounds[idx[0] - 1]["mpi_bytes"] if idx[0] > 0 else 0
            out[stage] = (rounds[idx[-1]], (rounds[idx[-1]]["mpi_bytes"] - before) / len(idx) / ranks)
    return out


def main(paths: list[str]) -> None:
    methods: dict[str, list[tuple[dict, list[dict]]]] = defaultdict(list)
    for path in paths:
        summary, rounds = _load(path)
        methods[re.sub(r"_s\d+$", "", summary["name"])].append((summary, rounds))
    print("| method | seeds | personalized mean | p10 | unseen (zero-leaf) | unseen (fine-tuned) | ARI "
          "| clusters | bytes up / client / round | MPI bytes / rank / round |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, runs in methods.items():
        col = lambda key: [s.get(key) for s, _ in runs]  # noqa: E731
        up = [s["bytes_up"] / sum(m["participants"] for m in r) for s, r in runs]
        mpi = [s["mpi_bytes"] / s["ranks"] / s["rounds"] for s, _ in runs]
        clusters = sorted({s["num_clusters"] for s, _ in runs if "num_clusters" in s})
        print(f"| {name} | {len(runs)} | {_stat(col('personalized_mean'))} | {_stat(col('personalized_p10'))} "
              f"| {_stat(col('unseen_accuracy'))} | {_stat(col('unseen_accuracy_finetuned'))} "
              f"| {_stat(col('cluster_ari'), 2)} | {', '.join(map(str, clusters)) or '–'} "
              f"| {np.mean(up):,.0f} | {np.mean(mpi):,.0f} |")
    for name, runs in methods.items():
        if "next_stage" not in runs[0][0]:
            continue
        ends = [_stage_ends(rounds, s["ranks"]) for s, rounds in runs]
        print(f"\n{name}: personalized mean at the end of each stage (tier ablation), over {len(runs)} seed(s)")
        print("| model evaluated | after round | personalized mean | p10 | MPI bytes / rank / round in the stage |")
        print("|---|---|---|---|---|")
        for stage, label in STAGE_LABELS.items():
            got = [e[stage] for e in ends if stage in e]
            if got:
                after = sorted({m["round"] for m, _ in got})
                print(f"| {label} | {', '.join(map(str, after))} | {_stat([m.get('personalized_mean') for m, _ in got])} "
                      f"| {_stat([m.get('personalized_p10') for m, _ in got])} | {np.mean([b for _, b in got]):,.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Markdown tables for docs/results.md ("HiLoRA") from run directories' summary.json and metrics.jsonl.

    python bench/hilora_table.py RUN_DIR...        # e.g. runs/hilora runs/fedit ...

What `fedhpc report` does not show for HiLoRA: one row per run with the clustering ARI and the
MPI bytes per rank per round, then for HiLoRA runs the personalized mean at the end of each
stage (the tier ablation) and the MPI bytes per rank per round in each stage.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt(v, digits=3):
    return "–" if v is None or v != v else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def main(paths: list[str]) -> None:
    print("| run | strategy | personalized mean | p10 | unseen (zero-shot) | unseen (fine-tuned) | ARI "
          "| bytes up / client / round | MPI bytes / rank / round |")
    print("|---|---|---|---|---|---|---|---|---|")
    tiered = []
    for path in paths:
        run = Path(path)
        s = json.loads((run / "summary.json").read_text())
        rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        clients = sum(m["participants"] for m in rounds)
        print(f"| {s['name']} | {s['strategy']} | {_fmt(s['personalized_mean'])} | {_fmt(s['personalized_p10'])} "
              f"| {_fmt(s['unseen_accuracy'])} | {_fmt(s['unseen_accuracy_finetuned'])} | {_fmt(s.get('cluster_ari'))} "
              f"| {s['bytes_up'] / clients:,.0f} | {s['mpi_bytes'] / s['ranks'] / s['rounds']:,.0f} |")
        if "next_stage" in s:
            tiered.append((s["name"], rounds, s["ranks"]))
    for name, rounds, ranks in tiered:
        print(f"\n{name}: personalized mean at the end of each stage (tier ablation), MPI bytes per rank per round")
        print("| model evaluated | after round | personalized mean | p10 | MPI bytes / rank / round in the stage |")
        print("|---|---|---|---|---|")
        trained = ["root"] + [m["next_stage"] for m in rounds[:-1]]  # the stage each round trained
        labels = {"root": "root", "cluster": "root + cluster", "leaf": "root + cluster + leaf"}
        for stage in ("root", "cluster", "leaf"):
            idx = [i for i, t in enumerate(trained) if t == stage]
            if not idx:
                continue
            last = rounds[idx[-1]]
            before = rounds[idx[0] - 1]["mpi_bytes"] if idx[0] > 0 else 0
            per_round = (last["mpi_bytes"] - before) / len(idx) / ranks
            print(f"| {labels[stage]} | {last['round']} | {_fmt(last.get('personalized_mean'))} "
                  f"| {_fmt(last.get('personalized_p10'))} | {per_round:,.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:])

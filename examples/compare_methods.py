"""Heterogeneous LoRA ranks: FedIT and the product-space methods on the planted benchmark.

    python examples/compare_methods.py                      # writes runs/compare/results.md
    mpiexec -n 2 python examples/compare_methods.py         # the same numbers on 2 ranks
    python examples/compare_methods.py --only ilora fedit --seeds 0 rounds=3   # a subset, overrides
    python examples/compare_methods.py --table-only         # rebuild results.md from finished runs

Each method runs its `configs/<method>.yaml` with the configured ranks [2, 4, 8] (cycled over
the clients) and with homogeneous r = 4 (`lora.ranks=[]`), once per seed (data, teacher, init
and sampling all change with it). The table (global accuracy, mean personalized accuracy:
mean ± std over seeds; MB sent up + down) is read back from each run's `summary.json`;
`fedhpc report <out>/<setting>/<run> ... --out DIR` draws per-round plots of the same runs.
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
VARIANTS = {  # label: (config, extra overrides)
    "fedit": ("fedit", []),
    "ilora (qr)": ("ilora", []),
    "ilora (svd)": ("ilora", ["strategy.aggregation=svd"]),
    "ilora (qr) + control": ("ilora", ["strategy.use_control=true"]),
    "ilora (qr), official scaling": ("ilora", ["strategy.scale_across_ranks=false"]),
    "flora": ("flora", []),
    "flexlora": ("flexlora", []),
    "hetlora": ("hetlora", []),
    "fedex_lora": ("fedex_lora", []),
    "lora_fair": ("lora_fair", []),
    "lora_fair, s_k-weighted": ("lora_fair", ["strategy.scale_across_ranks=true"]),
}
SETTINGS = {"ranks [2, 4, 8]": [], "r = 4": ["lora.ranks=[]"]}


def _folder(label: str) -> str:
    return label.replace(" ", "").replace("(", "_").replace(")", "").replace("+", "_").replace(",", "_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/compare", help="folder for the runs and results.md")
    parser.add_argument("--only", nargs="*", default=None, help="labels' configs to run (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="seeds per method and setting")
    parser.add_argument("--table-only", action="store_true", help="rebuild results.md from the runs already in --out")
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    out = Path(args.out)
    rows = []
    for label, (config, extra) in VARIANTS.items():
        if args.only and config not in args.only:
            continue
        cells = []
        for setting, rank_overrides in SETTINGS.items():
            folder = out / _folder(setting)
            summaries = []
            for seed in args.seeds:
                cfg = load_config(REPO / "configs" / f"{config}.yaml",
                                  [*extra, *rank_overrides, *args.overrides, f"seed={seed}", f"out_dir={folder}",
                                   f"name={_folder(label)}_s{seed}"])
                if not args.table_only:
                    summary = run(cfg, comm=comm, progress=False)
                    if comm.Get_rank() == 0:
                        print(f"{label:<22} {setting:<16} seed {seed}  global {summary['global_accuracy']:.3f}  "
                              f"personalized {summary['personalized_mean']:.3f}  {summary['wall_seconds']:.0f}s",
                              flush=True)
                if comm.Get_rank() == 0:
                    summaries.append(json.loads((folder / cfg.name / "summary.json").read_text()))
            cells.append(summaries)
        rows.append((label, cells))
    if comm.Get_rank() == 0:
        table = _table(rows)
        (out / "results.md").write_text(table)
        print(table)


def _table(rows) -> str:
    """Markdown: one row per method; per setting global and personalized accuracy (mean ± std over
    seeds), the mean per-seed difference of global accuracy to FedIT on the same seed (paired: the
    seed changes the task), and MB sent up + down per run."""
    head = "| method | " + " | ".join(f"{s}: global | Δ global vs fedit | personalized | MB" for s in SETTINGS) + " |"
    lines = [head, "|---|" + "---:|" * (4 * len(SETTINGS))]
    baseline = dict(rows).get("fedit")

    def values(summaries, key):
        return np.array([s[key] for s in summaries], dtype=float)

    def stat(v):
        return f"{v.mean():.3f} ± {v.std():.3f}"

    for label, cells in rows:
        parts = []
        for i, c in enumerate(cells):
            glob = values(c, "global_accuracy")
            paired = stat(glob - values(baseline[i], "global_accuracy")) if baseline else "n/a"
            parts.append(f"{stat(glob)} | {paired} | {stat(values(c, 'personalized_mean'))} | "
                         f"{np.mean([s['bytes_up'] + s['bytes_down'] for s in c]) / 1e6:.2f}")
        lines.append(f"| {label} | " + " | ".join(parts) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

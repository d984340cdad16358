"""Strong and weak scaling of `fedhpc run` over MPI ranks on one node (a markdown table).

    python bench/scaling.py [--ranks 1,2,4] [--clients 32] [--per-rank 8]

FedIT on the quickstart's model and planted data (configs/quickstart.yaml) scaled down to
48 samples per client, 1 local epoch (3 steps of 16), 4 rounds; every rank runs one torch
thread (OMP_NUM_THREADS=1). Strong scaling: `--clients` clients on every rank count; weak:
`--per-rank` clients per rank. The rate is participants / round_seconds averaged over rounds 2
and 3 (round 1 pays first-touch allocation; the last round also evaluates); efficiency is the
rate over (ranks x the 1-rank rate) in both (ideal: strong scaling divides the round's time by
the rank count, weak scaling keeps it while the clients grow with the ranks). More ranks than cores oversubscribe the node: the table says how many
cores there were.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = ["data.planted.samples_per_client=48", "train.local_epochs=1", "rounds=4", "eval.every=100",
        "strategy.name=fedit", "data.unseen_fraction=0.0", "--quiet"]


def rate(ranks: int, clients: int, out: Path) -> float:
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or "mpiexec"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [mpiexec, "-n", str(ranks), sys.executable, "-m", "fedhpc", "run", str(ROOT / "configs/quickstart.yaml"),
           *BASE, f"num_clients={clients}", f"out_dir={out}"]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True, text=True)
    lines = [json.loads(x) for x in next(out.rglob("metrics.jsonl")).read_text().splitlines() if x.strip()]
    timed = [m for m in lines if m["round"] in (2, 3)]
    return sum(m["participants"] / m["round_seconds"] for m in timed) / len(timed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--clients", type=int, default=32, help="strong scaling: clients on every rank count")
    parser.add_argument("--per-rank", type=int, default=8, help="weak scaling: clients per rank")
    args = parser.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    cores = os.cpu_count()
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average before (1/5/15 min): {load}, {cores} cores")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, clients_of in (("strong", lambda n: args.clients), ("weak", lambda n: args.per_rank * n)):
            base = None
            for n in ranks:
                r = rate(n, clients_of(n), Path(tmp) / f"{kind}{n}")
                base = base if base is not None else r
                eff = r / (n * base)  # ideal: the rate grows with the ranks (strong: time / n; weak: same time)
                over = " (oversubscribed)" if n > cores else ""
                rows.append(f"| {kind} | {n}{over} | {clients_of(n)} | {r:.1f} | {r / base:.2f}x | {eff:.0%} |")
    print("| scaling | ranks | clients | clients/s | speed-up | efficiency |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"load average after (1/5/15 min): {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The same FedIT rounds three ways, each in its own process tree: fedhpc's cohort trainer, the
hand-written sequential peft loop, and Flower's simulation engine (Ray), with client-updates/s
and the peak resident memory of the whole process tree (Ray's GCS, raylet and workers included).

    .venv-bench/bin/python bench/throughput.py --peers      (or bench/peers.py directly)

Flower (`flwr[simulation]`, requirements-bench.txt) is never needed by the main install; it
lives in its own venv that sees the main venv's torch through a .pth file (README, Benchmarks).

The work: `ROUNDS` FedIT rounds over `CLIENTS` clients of the overhead-bound regime's model and
data (bench/throughput.py: ViT depth 4 width 64, 64 patches, LoRA r=4 on qkv + head, 16 samples
per client, batch 16, 1 epoch, AdamW lr 1e-3 wd 0.01, a fresh optimizer per client and round).
One untimed warm-up round, then `ROUNDS` timed rounds (all three alike: round 0 is where
Ray's workers import torch and build their model). Every client starts each round from the global adapters; the new global is their mean (equal
sample counts: FedIT's weighted mean, Flower's FedAvg by "num-examples"). The three final global
adapters are compared, so the rates are for the same work.

- fedhpc: `local_train` over passes of `clients_per_pass` (the probe's pick; the probe's time is
  not counted, as a run pays it once at start), then the mean.
- sequential: one peft model; per client copy the global in, AdamW, train, add to the sum.
- flower: a `ClientApp` whose train() loads the global arrays into a peft model (built once per
  Ray worker), trains as the sequential loop does and replies the trained arrays; a `ServerApp`
  runs Flower's own `FedAvg` strategy for 1 + `ROUNDS` rounds. Ray gets `--cpus` CPUs (default
  1) and one CPU per client, so `--cpus` clients train at once. Timed between the ends of round 0
  and of the last round (a stamp in FedAvg's metrics aggregation); Ray's start-up and round 0
  are reported beside, not counted.

Peak memory: the parent samples the RSS of the worker process and all its descendants every
20 ms (psutil) and keeps the largest sum; shared pages count once per process (RSS), as `top`
would show them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

CLIENTS, ROUNDS = int(os.environ.get("FEDHPC_PEERS_CLIENTS", 32)), 2
TRAINERS = ("fedhpc", "sequential", "flower")


def _setup(device="cpu"):
    from throughput import REGIMES, Setup
    return Setup(replace(REGIMES["overhead"], clients=CLIENTS), torch.device(device))


def _global_start(s) -> dict[str, torch.Tensor]:
    return {k: v[:1].clone() for k, v in s.start.items()}


def _broadcast(glob: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    return {k: v.expand(n, *v.shape[1:]).clone() for k, v in glob.items()}


def run_fedhpc(out: Path, precision: str) -> dict:
    from fedhpc.train.local import probe_clients_per_pass
    s = _setup()
    s.cfg = replace(s.cfg, precision=precision)
    pick = probe_clients_per_pass(s.cohort, sample=s.x[0], batch_size=s.regime.batch, max_clients=CLIENTS,
                                  trainable=s.trainable, precision=precision)
    glob = _global_start(s)
    for r in range(1 + ROUNDS):  # round 0 warms up, untimed
        if r == 1:
            t0 = time.perf_counter()
        store = _broadcast(glob, CLIENTS)
        s.cohort_round(store, pick)
        glob = {k: v.mean(0, keepdim=True) for k, v in store.items()}
    seconds = time.perf_counter() - t0
    torch.save(glob, out)
    return {"seconds": seconds, "note": f"clients_per_pass {pick}"}


def run_sequential(out: Path) -> dict:
    s = _setup()
    glob = _global_start(s)
    for r in range(1 + ROUNDS):  # round 0 warms up, untimed
        if r == 1:
            t0 = time.perf_counter()
        store = _broadcast(glob, CLIENTS)
        s.sequential_round(store)
        glob = {k: v.mean(0, keepdim=True) for k, v in store.items()}
    seconds = time.perf_counter() - t0
    torch.save(glob, out)
    return {"seconds": seconds, "note": ""}


# --- Flower: module-level apps, so Ray workers import them by name ---
_WORKER = {}


def _worker_setup():
    """Per Ray worker process: the data and a peft model, built once."""
    if "s" not in _WORKER:
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        _WORKER["s"] = _setup()
        print(f"peers: Ray worker {os.getpid()} built its model and data in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr, flush=True)
    return _WORKER["s"]


def _client_app():
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from fedhpc.train.local import client_batches
    import torch.nn.functional as F

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from throughput import ROUND, SEED
        s = _worker_setup()
        c = int(context.node_config["partition-id"])
        arrays = msg.content["arrays"].to_torch_state_dict()
        cfg = s.cfg.optimizer
        with torch.no_grad():
            for k, p in s.params.items():
                p.copy_(arrays[k].view(p.shape))
        opt = torch.optim.AdamW(s.params.values(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                weight_decay=cfg.weight_decay)
        for rows in client_batches(s.indices[c], seed=SEED, client=c, round_index=ROUND, cfg=s.cfg):
            rows = torch.from_numpy(rows)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(s.peft(s.x[rows]), s.y[rows]).backward()
            opt.step()
        trained = {k: p.detach().clone().unsqueeze(0) for k, p in s.params.items()}
        content = RecordDict({"arrays": ArrayRecord(trained),
                              "metrics": MetricRecord({"num-examples": len(s.indices[c])})})
        return Message(content=content, reply_to=msg)

    return app


def _server_app(start: dict[str, torch.Tensor], out: Path, record: dict):
    from flwr.app import ArrayRecord, Context, MetricRecord
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        stamps = [time.perf_counter()]

        def stamp(replies, key):  # called once per round, when the round's replies are in
            stamps.append(time.perf_counter())
            return MetricRecord({})

        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=CLIENTS,
                          min_available_nodes=CLIENTS, train_metrics_aggr_fn=stamp)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(start), num_rounds=1 + ROUNDS)
        record["seconds"] = stamps[-1] - stamps[1]  # round 0 warms up (Ray workers build their model)
        record["warmup"] = stamps[1] - stamps[0]
        torch.save({k: v.clone() for k, v in result.arrays.to_torch_state_dict().items()}, out)

    return app


CLIENT_APP = None


def run_flower(out: Path, cpus: int) -> dict:
    global CLIENT_APP
    from flwr.simulation import run_simulation
    s = _setup()
    start = _global_start(s)
    record = {}
    import peers  # by module name, so Ray workers unpickle the app's helpers by reference (one setup each)
    CLIENT_APP = peers._client_app()
    t0 = time.perf_counter()
    run_simulation(server_app=_server_app(start, out, record), client_app=CLIENT_APP, num_supernodes=CLIENTS,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
                                                 "object_store_memory": 256 * 2 ** 20}})
    wall = time.perf_counter() - t0
    if "seconds" not in record:
        raise RuntimeError("Flower's ServerApp did not finish")
    return {"seconds": record["seconds"], "note": f"Ray {cpus} CPU(s); warm-up round {record['warmup']:.1f} s; "
                                                  f"whole simulation incl. Ray start {wall:.1f} s"}


def _tree_rss(proc) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except Exception:  # a worker that just exited
            pass
    return total


def measure(trainer: str, *, precision: str, cpus: int, python: str, workdir: Path) -> dict:
    """Run one trainer in a fresh process; its JSON result plus the peak RSS of its process tree."""
    import psutil
    out = workdir / f"{trainer}.pt"
    res = workdir / f"{trainer}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([python, __file__, "--worker", trainer, "--out", str(out), "--result", str(res),
                             "--precision", precision, "--cpus", str(cpus)], env=env, cwd=ROOT)
    ps, peak, stop = psutil.Process(proc.pid), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss(ps))
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    code = proc.wait()
    stop.set()
    thread.join()
    if code != 0:
        raise RuntimeError(f"{trainer} worker failed (exit {code})")
    result = json.loads(res.read_text())
    result.update(trainer=trainer, peak_rss=peak[0], glob=torch.load(out))
    return result


def report(results: list[dict]) -> None:
    updates = CLIENTS * ROUNDS
    by = {r["trainer"]: r for r in results}
    print(f"\n== peers: {ROUNDS} timed FedIT rounds x {CLIENTS} clients = {updates} client-updates "
          f"(overhead-regime model and data), each trainer in its own process tree")
    print(f"  {'trainer':12s} {'updates/s':>10s} {'seconds':>8s} {'peak RSS (tree)':>16s}   note")
    for r in results:
        print(f"  {r['trainer']:12s} {updates / r['seconds']:10.1f} {r['seconds']:8.2f} "
              f"{r['peak_rss'] / 2 ** 20:12.0f} MiB   {r['note']}")
    ref = by.get("sequential", results[0])
    for r in results:
        if r is ref:
            continue
        d = max((r["glob"][k].reshape(-1) - ref["glob"][k].reshape(-1)).abs().max().item() for k in ref["glob"])
        print(f"  same work: max |{r['trainer']} - {ref['trainer']}| over the final global adapters: {d:.1e}")
    if "fedhpc" in by:
        f = by["fedhpc"]
        for r in results:
            if r is not f:
                print(f"  fedhpc vs {r['trainer']}: {r['seconds'] / f['seconds']:.2f}x client-updates/s at "
                      f"{f['peak_rss'] / r['peak_rss']:.2f}x its peak memory")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=TRAINERS)
    parser.add_argument("--out")
    parser.add_argument("--result")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--cpus", type=int, default=1, help="torch threads of fedhpc / sequential; Ray's CPUs")
    parser.add_argument("--trainers", default=",".join(TRAINERS))
    args = parser.parse_args(argv)
    if args.worker:
        torch.set_num_threads(args.cpus if args.worker != "flower" else 1)
        from fedhpc.train.local import keep_freed_memory
        keep_freed_memory()
        if args.worker == "fedhpc":
            result = run_fedhpc(Path(args.out), args.precision)
        elif args.worker == "sequential":
            result = run_sequential(Path(args.out))
        else:
            result = run_flower(Path(args.out), args.cpus)
        Path(args.result).write_text(json.dumps(result))
        return 0
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(t, precision=args.precision, cpus=args.cpus, python=sys.executable, workdir=Path(tmp))
                   for t in args.trainers.split(",")]
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

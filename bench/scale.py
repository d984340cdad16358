"""Issue 21: a federation of 10⁴ stateful clients on one node. Three measurements, one subcommand each.

    python bench/scale.py cluster  --clients 200 1000 10000 --exact-up-to 200
    python bench/scale.py train    --clients 1000 10000 --ranks 1 2 ...
    python bench/scale.py checkpoint RUN_DIR ...

`cluster`: HiLoRA's clustering step (LSAC) on planted statistics shaped like ViT-B's: 24 matrices
of B [768, 8], K = 5 planted subspaces, B_i = U_c(i) M_i + noise. The exact path
(`cluster_clients`: every pair, every matrix) where it finishes, and the scalable path
(`cluster_clients_scalable`: projection, k-NN graph, sparse spectral), with seconds and the
adjusted Rand index against the planted clusters. Statistics are generated and projected in blocks
of 512 clients (what the server would receive); generation is not timed, projection is.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _planted(rng, truth, U, noise, lo, hi):
    from fedhpc.strategies.subspace_clustering import Statistic

    ids = truth[lo:hi]
    r = U[0][0].shape[1]
    return [Statistic(torch.from_numpy(np.stack([Um[c] for c in ids]) @ rng.standard_normal((len(ids), r, r)).astype(np.float32)
                                       + noise * rng.standard_normal((len(ids), Um[0].shape[0], r)).astype(np.float32)))
            for Um in U]


def cluster(args) -> None:
    from sklearn.metrics import adjusted_rand_score

    from fedhpc.strategies.subspace_clustering import (Statistic, cluster_clients, cluster_projected,
                                                       principal_bases, project_statistics)

    print("| clients | path | CPU seconds, one thread (wall) | K found | ARI |")
    print("|---|---|---|---|---|")
    for n in args.clients:
        for seed in args.seeds:
            rng = np.random.default_rng(seed)
            truth = rng.permutation(np.arange(n) % args.k)
            U = [[np.linalg.qr(rng.standard_normal((args.p, args.r)))[0].astype(np.float32) for _ in range(args.k)]
                 for _ in range(args.matrices)]
            blocks, t_proj, c_proj, bases = [], 0.0, 0.0, None
            for lo in range(0, n, 512):
                part = _planted(rng, truth, U, args.noise, lo, min(n, lo + 512))
                if bases is None and args.basis == "principal":  # from the first block: a random sample of clients
                    t0, c0 = time.perf_counter(), time.process_time()
                    bases = principal_bases(part, width=args.width, seed=seed)
                    t_proj += time.perf_counter() - t0
                    c_proj += time.process_time() - c0
                if n <= args.exact_up_to:
                    blocks.append(part)
                t0, c0 = time.perf_counter(), time.process_time()
                projected = project_statistics(part, similarity="subspace", width=args.width, seed=seed, bases=bases)
                t_proj += time.perf_counter() - t0
                c_proj += time.process_time() - c0
                blocks.append(projected) if n > args.exact_up_to else blocks.append(projected)
            parts = blocks[1::2] if n <= args.exact_up_to else blocks
            projected = [(parts[0][m][0], torch.cat([p[m][1] for p in parts]), None) for m in range(args.matrices)]
            t0, c0 = time.perf_counter(), time.process_time()
            found = cluster_projected(projected, k_min=2, k_max=10, neighbors=args.neighbors, candidates=args.candidates,
                                      seed=seed)
            seconds = t_proj + time.perf_counter() - t0
            cpu = c_proj + time.process_time() - c0
            print(f"| {n} | scalable ({args.basis} width {args.width}, {args.neighbors}-NN, {args.candidates or 'default'} candidates) | {cpu:.1f} ({seconds:.1f}) | {found.count} | "
                  f"{adjusted_rand_score(truth, found.labels):.3f} |", flush=True)
            if n <= args.exact_up_to:
                stats = [Statistic(torch.cat([b[m].B for b in blocks[0::2]])) for m in range(args.matrices)]
                t0, c0 = time.perf_counter(), time.process_time()
                exact = cluster_clients(stats, k_min=2, k_max=10, similarity="subspace", seed=seed)
                print(f"| {n} | exact (dense kernel) | {time.process_time() - c0:.1f} ({time.perf_counter() - t0:.1f}) | {exact.count} | "
                      f"{adjusted_rand_score(truth, exact.labels):.3f} |", flush=True)


def _vit_b_rows() -> tuple[dict, dict]:
    """FedSA-LoRA's kept rows on ViT-B (qkv, r = 8, 10 classes, private head): the B factors and
    head, and AdamW's two moments of every trained tensor (A, B, head) plus the step count."""
    kept, trained = {}, {}
    for b in range(12):
        trained[f"blocks.{b}.attn.qkv.lora_A"] = torch.zeros(1, 8, 768)
        trained[f"blocks.{b}.attn.qkv.lora_B"] = kept[f"blocks.{b}.attn.qkv.lora_B"] = torch.zeros(1, 2304, 8)
    trained["head.weight"] = kept["head.weight"] = torch.zeros(1, 10, 768)
    trained["head.bias"] = kept["head.bias"] = torch.zeros(1, 10)
    opt = {"step": torch.zeros(1, dtype=torch.int64)}
    for k, v in trained.items():
        opt[f"{k}.exp_avg"], opt[f"{k}.exp_avg_sq"] = torch.zeros_like(v), torch.zeros_like(v)
    return kept, opt


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    """Linux: reset VmHWM to the current RSS (writing 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def checkpoint_worker(args) -> None:
    """Under mpiexec: every rank fills a paged store with random rows of its block of clients,
    then one streamed checkpoint is written and timed, then rank 0 writes the same bytes as one
    plain sequential file (64 MiB writes, fsync) for comparison."""
    from mpi4py import MPI

    from fedhpc.io.checkpoint import Checkpointer, CheckpointConfig, verify
    from fedhpc.runtime.world import block_range
    from fedhpc.store import PagedStore

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    out = Path(args.out)
    lo, hi = block_range(args.clients, size, rank)
    clients = np.arange(lo, hi)
    kept, opt = _vit_b_rows()
    stores = {"clients": PagedStore(clients, kept, path=out / f"store/clients-{rank}.bin", cap_bytes=0),
              "optimizer": PagedStore(clients, opt, path=out / f"store/optimizer-{rank}.bin", cap_bytes=0)}
    g = torch.Generator().manual_seed(rank)
    for store in stores.values():
        for a in range(0, len(clients), 64):
            n = min(64, len(clients) - a)
            store.write_rows(a, {k: (torch.randn(n, *shape, generator=g) if dtype.is_floating_point
                                     else torch.full((n, *shape), 3, dtype=dtype))
                                 for k, (shape, dtype) in store.spec.items()})
    comm.Barrier()
    _reset_peak()
    before = _status_mb("VmRSS")
    ckpt = Checkpointer(out / "run", CheckpointConfig(gather_limit_mb=0, chunk_mb=args.chunk_mb), comm=comm,
                        rounds=1, config={"strategy": {"name": "fedsa_lora"}}, num_clients=args.clients, fresh=True)
    server = {"head.weight": torch.zeros(10, 768)}
    comm.Barrier()
    t0 = time.perf_counter()
    path = ckpt.save(1, server=server, clients=stores["clients"], optimizer=stores["optimizer"],
                     totals={"bytes_up": 0, "bytes_down": 0, "mpi_bytes": 0}, metrics=[], wall_seconds=0.0)
    comm.Barrier()
    seconds = time.perf_counter() - t0
    extra = comm.gather(round(_status_mb("VmHWM") - before, 1), root=0)
    if rank == 0:
        nbytes = path.stat().st_size
        raw = out / "raw.bin"
        block = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes()
        t0 = time.perf_counter()
        fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        left = nbytes
        while left > 0:
            left -= os.write(fd, block[:min(left, len(block))])
        os.fsync(fd)
        os.close(fd)
        raw_seconds = time.perf_counter() - t0
        raw.unlink()
        ok = all(ok for *_, ok in verify(path)) if args.verify else None
        print(json.dumps({"clients": args.clients, "ranks": size, "bytes": nbytes, "seconds": seconds,
                          "mb_per_s": nbytes / seconds / 2 ** 20, "raw_mb_per_s": nbytes / raw_seconds / 2 ** 20,
                          "ratio": raw_seconds / seconds, "peak_extra_mb_per_rank": extra,
                          "checksums_ok": ok}), flush=True)
    for store in stores.values():
        store.close()


def checkpoint(args) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for ranks in args.ranks:
        out = Path(args.out) / f"ckpt{ranks}"
        subprocess.run(["mpiexec", "-n", str(ranks), sys.executable, __file__, "_checkpoint", "--clients",
                        str(args.clients), "--out", str(out), "--chunk-mb", str(args.chunk_mb),
                        *(["--verify"] if args.verify else [])], check=True, env=env)
        subprocess.run(["rm", "-rf", str(out)], check=True)


def train(args) -> None:
    """FedSA-LoRA on configs/scale.yaml at each client count and rank count: each rank's peak RSS
    (ru_maxrss), the training rounds' seconds (metrics.jsonl; the last round also evaluates)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print("| clients | ranks | store | peak RSS per rank (GiB) | training rounds: wall s | CPU s per rank | "
          "rows paged out / in |")
    print("|---|---|---|---|---|---|---|")
    for n in args.clients:
        for ranks in args.ranks:
            name = f"scale_n{n}_r{ranks}"
            proc = subprocess.run(["mpiexec", "-n", str(ranks), sys.executable, __file__, "_train", args.config,
                                   f"num_clients={n}", f"rounds={args.rounds}", f"out_dir={args.out}", f"name={name}",
                                   *args.overrides], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:])
                raise SystemExit(1)
            reports = [json.loads(f.read_text()) for f in sorted((Path(args.out) / name).glob("rss-*.json"))]
            metrics = [json.loads(line) for line in (Path(args.out) / name / "metrics.jsonl").read_text().splitlines()]
            seconds = [m["round_seconds"] for m in metrics[:-1]]
            rss = ", ".join(f"{r['rss_gib']:.2f}" for r in sorted(reports, key=lambda r: r["rank"]))
            paged = sum(r["writes"] for r in reports), sum(r["reads"] for r in reports)
            cpu = "; ".join(", ".join(f"{c:.1f}" for c in r["cpu"][:-1]) for r in sorted(reports, key=lambda r: r["rank"]))
            print(f"| {n} | {ranks} | {reports[0]['store']} | {rss} | "
                  f"{', '.join(f'{s:.1f}' for s in seconds)} | {cpu} | {paged[0]} / {paged[1]} |", flush=True)


def train_worker(argv) -> None:
    """One rank of a training run: fedhpc run, then this rank's peak RSS and store traffic."""
    from mpi4py import MPI

    import fedhpc.experiment as experiment
    from fedhpc.config import load_config

    seen = {}
    fresh = experiment._fresh_state

    def spy(r):
        state = fresh(r)
        seen["state"] = state
        return state

    experiment._fresh_state = spy
    cpu = []
    one_round = experiment._round

    def timed(*a, **k):  # this rank's CPU seconds per round: wall time on a loaded machine says little
        c0 = time.process_time()
        out = one_round(*a, **k)
        cpu.append(time.process_time() - c0)
        return out

    experiment._round = timed
    cfg = load_config(argv[0], argv[1:])
    experiment.run(cfg, comm=MPI.COMM_WORLD, progress=False)
    stores = [s for s in (seen["state"].store, seen["state"].opt_store) if s is not None]
    rank = MPI.COMM_WORLD.Get_rank()  # one file per rank: the ranks' stdout lines may interleave
    (Path(cfg.out_dir) / cfg.name / f"rss-{rank}.json").write_text(json.dumps(
        {"rank": rank, "rss_gib": _rss_mb() / 1024, "store": type(stores[0]).__name__, "cpu": cpu,
         "writes": sum(getattr(s, "writes", 0) for s in stores), "reads": sum(getattr(s, "reads", 0) for s in stores)}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_train":
        return train_worker(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cluster")
    c.add_argument("--clients", type=int, nargs="+", default=[200, 1000, 10000])
    c.add_argument("--exact-up-to", type=int, default=200)
    c.add_argument("--seeds", type=int, nargs="+", default=[0])
    c.add_argument("--k", type=int, default=5)
    c.add_argument("--matrices", type=int, default=24)
    c.add_argument("--p", type=int, default=768)
    c.add_argument("--r", type=int, default=8)
    c.add_argument("--noise", type=float, default=0.05)
    c.add_argument("--width", type=int, default=64)
    c.add_argument("--neighbors", type=int, default=30)
    c.add_argument("--candidates", type=int, default=0, help="0: cluster_projected's default")
    c.add_argument("--basis", choices=["principal", "gaussian"], default="principal")
    c.set_defaults(func=cluster)
    t = sub.add_parser("train")
    t.add_argument("--config", default="configs/scale.yaml")
    t.add_argument("--clients", type=int, nargs="+", default=[1000, 10000])
    t.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    t.add_argument("--rounds", type=int, default=3)
    t.add_argument("--out", default="runs/scale")
    t.add_argument("overrides", nargs="*")
    t.set_defaults(func=train)
    for name, func in (("checkpoint", checkpoint), ("_checkpoint", checkpoint_worker)):
        k = sub.add_parser(name)
        k.add_argument("--clients", type=int, default=1000)
        k.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
        k.add_argument("--out", default="runs/scale_ckpt")
        k.add_argument("--chunk-mb", type=float, default=64.0)
        k.add_argument("--verify", action="store_true")
        k.set_defaults(func=func)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()

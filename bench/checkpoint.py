"""Checkpoint benchmark: HDF5 write vs a raw write of the same bytes, loop blocking, file size.

    python bench/checkpoint.py                      # 32 clients, 4 layers, d=768, r=16, AdamW state
    python bench/checkpoint.py --clients 8 --layers 2 --repeats 2   # quick
    fedhpc bench checkpoint -- --folder /scratch/me                 # on the disk checkpoints go to

Prints three figures, each against a baseline measured in the same run:
1. write throughput of `write_checkpoint` (tmp file, per-dataset CRC-32, fsync, rename, directory
   fsync) against a plain sequential `write()` + fsync of the same bytes to the same folder (ratio);
2. the time the round loop is blocked per checkpoint: simulated rounds of fixed compute (matmuls
   on the main thread) with a background checkpoint after each, against the same rounds without
   checkpoints (and the blocking of a synchronous write, for scale);
3. the file size against the adapter + optimizer bytes it must hold.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedhpc.io.checkpoint import CheckpointConfig, Checkpointer, Snapshot, _to_numpy, write_checkpoint  # noqa: E402
from fedhpc.train.local import keep_freed_memory  # noqa: E402


def client_state(clients: int, layers: int, d: int, r: int) -> tuple[dict, dict, dict]:
    """Server, client and AdamW tensors of a ViT-like model: LoRA on qkv (d -> 3d) and fc1 (d -> 4d)."""
    g = torch.Generator().manual_seed(0)
    clients_t, server = {}, {}
    for layer in range(layers):
        for name, d_out in (("attn.qkv", 3 * d), ("mlp.fc1", 4 * d)):
            key = f"blocks.{layer}.{name}"
            server[f"{key}.lora_A"] = torch.randn(1, r, d, generator=g)
            clients_t[f"{key}.lora_B"] = torch.randn(clients, d_out, r, generator=g)
            clients_t[f"{key}.lora_A"] = torch.randn(clients, r, d, generator=g)
    optimizer = {f"{k}.{s}": torch.randn(v.shape, generator=g) for k, v in clients_t.items()
                 for s in ("exp_avg", "exp_avg_sq")}
    optimizer["step"] = torch.zeros(clients, dtype=torch.int64)
    return server, clients_t, optimizer


def raw_write(path: Path, arrays: list[np.ndarray]) -> None:
    with open(path, "wb") as f:
        for a in arrays:
            f.write(memoryview(np.ascontiguousarray(a)).cast("B"))
        f.flush()
        os.fsync(f.fileno())


def write_ratio(folder: Path, server, clients, optimizer, repeats: int) -> dict:
    tensors = {"server": {k: _to_numpy(v) for k, v in server.items()},
               "clients": {k: _to_numpy(v) for k, v in clients.items()},
               "optimizer": {k: _to_numpy(v) for k, v in optimizer.items()}}
    arrays = [a for group in tensors.values() for a, _ in group.values()]
    payload = sum(a.nbytes for a in arrays)
    attrs = {"rounds": 1, "num_clients": len(optimizer["step"]), "strategy": "bench", "wall_seconds": 0.0,
             "created": "", "bytes_up": 0, "bytes_down": 0, "mpi_bytes": 0}
    snap = Snapshot(1, attrs, "config: bench\n", "", tensors)
    ours, raw, size = [], [], 0
    for _ in range(repeats):  # alternate, so drifting disk or CPU contention hits both alike
        t0 = time.perf_counter()
        write_checkpoint(folder / "ckpt.h5", snap)
        ours.append(time.perf_counter() - t0)
        size = (folder / "ckpt.h5").stat().st_size
        (folder / "ckpt.h5").unlink()
        t0 = time.perf_counter()
        raw_write(folder / "raw.bin", arrays)
        raw.append(time.perf_counter() - t0)
        (folder / "raw.bin").unlink()
    t_ours, t_raw = statistics.median(ours), statistics.median(raw)
    return {"payload": payload, "file": size, "ours_s": t_ours, "raw_s": t_raw}


def compute_round(work: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        work = torch.tanh(work @ work.T / work.shape[1])


def blocking(folder: Path, server, clients, optimizer, rounds: int, steps: int) -> dict:
    from mpi4py import MPI

    work = torch.randn(512, 512, generator=torch.Generator().manual_seed(1))
    totals, blocked = {}, {}
    for mode in ("none", "background", "sync", "none"):
        ckpt = Checkpointer(folder / mode, CheckpointConfig(every=1, keep=1, background=mode != "sync"),
                            comm=MPI.COMM_SELF, rounds=rounds, config={"strategy": {"name": "bench"}},
                            num_clients=len(optimizer["step"]), fresh=True)
        t0 = time.perf_counter()
        for round_index in range(1, rounds + 1):
            compute_round(work, steps)
            if mode != "none":
                ckpt.save(round_index, server=server, clients=clients, optimizer=optimizer,
                          totals={"bytes_up": 0, "bytes_down": 0, "mpi_bytes": 0}, metrics=[], wall_seconds=0.0)
        ckpt.wait()
        elapsed = (time.perf_counter() - t0) / rounds
        totals.setdefault(mode, []).append(elapsed)
        if mode != "none":
            blocked[mode] = statistics.median(ckpt.blocked_seconds)
            blocked[mode + "_wait"] = statistics.median(ckpt.waited_seconds)
    return {"round_none_s": min(totals["none"]), "round_background_s": totals["background"][0],
            "round_sync_s": totals["sync"][0], "blocked_background_s": blocked["background"],
            "waited_background_s": blocked["background_wait"], "blocked_sync_s": blocked["sync"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4, help="simulated rounds for the blocking figure")
    parser.add_argument("--steps", type=int, default=200, help="512x512 matmuls per simulated round")
    parser.add_argument("--folder", default=None, help="where to write (default: a temporary folder in ./runs)")
    args = parser.parse_args()
    keep_freed_memory()  # as every CPU run does (local_train): snapshot buffers reuse the heap, no page faults
    server, clients, optimizer = client_state(args.clients, args.layers, args.d, args.r)
    base = Path(args.folder or "runs")
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base, prefix="bench-checkpoint-") as tmp:
        folder = Path(tmp)
        w = write_ratio(folder, server, clients, optimizer, args.repeats)
        b = blocking(folder, server, clients, optimizer, args.rounds, args.steps)
    mb = w["payload"] / 1e6
    print(f"checkpoint of {args.clients} clients x {args.layers} layers (d={args.d}, r={args.r}, AdamW state): "
          f"{mb:.1f} MB of tensors, folder {base.resolve()}")
    print(f"1. write: fedhpc {mb / w['ours_s']:.0f} MB/s ({w['ours_s']:.3f} s) vs raw sequential write + fsync "
          f"{mb / w['raw_s']:.0f} MB/s ({w['raw_s']:.3f} s): throughput ratio {w['raw_s'] / w['ours_s']:.2f}")
    print(f"2. round loop blocked per checkpoint: background {1e3 * b['blocked_background_s']:.1f} ms "
          f"(of which {1e3 * b['waited_background_s']:.1f} ms waiting for the previous write; the rest is the "
          f"snapshot copy), synchronous write {1e3 * b['blocked_sync_s']:.1f} ms; round time {b['round_none_s']:.3f} s without "
          f"checkpoints, {b['round_background_s']:.3f} s with background checkpoints "
          f"(x{b['round_background_s'] / b['round_none_s']:.2f}), {b['round_sync_s']:.3f} s with synchronous ones "
          f"(x{b['round_sync_s'] / b['round_none_s']:.2f})")
    print(f"3. file size {w['file'] / 1e6:.1f} MB for {mb:.1f} MB of adapter + optimizer tensors: "
          f"ratio {w['file'] / w['payload']:.4f}")


if __name__ == "__main__":
    main()

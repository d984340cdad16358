"""Issue 21: FedTreeLoRA's tree at 10³ and 10⁴ clients.

    OMP_NUM_THREADS=1 python bench/tree_scale.py --clients 1000 2000 10000 --exact-up-to 2000

The tree's distances cost O(n²) per layer (10⁴ clients: 0.8 GB per layer and per silhouette), so
`strategy.tree_clients` (default 1000) builds it on a seeded sample and routes every other client,
per layer, to the cluster whose mean B is nearest its own (what a client outside the tree gets when
it is first sampled). This times the strategy's own code on planted warm-up factors shaped like
ViT-B's `qkv` (B [2304, 8], A [8, 768]) in `--layers` blocks, with nested planted groups (1, 2, 4, 4
… per layer, shallow to deep) plus noise: the build (distances, tree, cuts, cluster experts) on the
tree clients, then the routing of all the others in blocks of 512 (generated block by block, as the
server would meet them; generation not timed), and the ARI of every client's cluster per layer
against the planted groups. CPU seconds, since the machine is shared.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

D_IN, D_OUT, R = 768, 3 * 768, 8


def _groups(clients: np.ndarray, layers: int) -> np.ndarray:
    """`[layers, n]` planted group per layer: 1, 2, 4, 4, … (nested: deeper splits shallower; the
    window rule adds at most 2 clusters a layer)."""
    return np.stack([clients % _count(l) for l in range(layers)])


def _count(layer: int) -> int:
    return 2 ** min(layer, 2)


def _factors(clients: np.ndarray, layers: int, noise: float) -> dict[str, torch.Tensor]:
    """Warm-up factors of `clients`: B at layer l = its group's centre + noise, A random."""
    out = {}
    groups = _groups(clients, layers)
    for l in range(layers):
        centres = torch.randn(_count(l), D_OUT, R, generator=torch.Generator().manual_seed(1000 + l))
        g = torch.Generator().manual_seed(int(clients[0]) * 31 + l)
        out[f"blocks.{l}.attn.qkv.lora_B"] = (centres[torch.as_tensor(groups[l])]
                                              + noise * torch.randn(len(clients), D_OUT, R, generator=g))
        out[f"blocks.{l}.attn.qkv.lora_A"] = torch.randn(len(clients), R, D_IN, generator=g)
    return out


def _strategy(n: int, layers: int, cap: int):
    from fedhpc.configtree import build
    from fedhpc.models.ranks import ClientRanks
    from fedhpc.strategies import Population, StrategyConfig, build_strategy

    shapes = {"head.weight": (10, D_IN), "head.bias": (10,)}  # private: never gathered
    for l in range(layers):
        shapes[f"blocks.{l}.attn.qkv.lora_A"], shapes[f"blocks.{l}.attn.qkv.lora_B"] = (R, D_IN), (D_OUT, R)
    population = Population(num_examples=np.full(n, 50.0), groups=np.full(n, -1), ranks=ClientRanks(np.full(n, R), 2.0))
    cfg = build(StrategyConfig, {"name": "fedtreelora", "warmup_rounds": 1, "head": "private", "tree_clients": cap})
    return build_strategy(cfg, shapes=shapes, population=population)


def measure(n: int, layers: int, cap: int, noise: float) -> dict:
    from sklearn.metrics import adjusted_rand_score

    from fedhpc.runtime.exchange import Rows

    strategy = _strategy(n, layers, cap)
    clients = np.arange(n)
    server = strategy.init_server({k: torch.zeros(1, *s) for k, s in strategy.shapes.items()}, frozen={})
    tree_clients = strategy.configure_train(server, clients, clients).participants
    rows = Rows(_factors(tree_clients, layers, noise), torch.as_tensor(tree_clients), torch.ones(len(tree_clients)))
    t0 = time.process_time()
    server = {**server, **strategy._build(server, rows)}
    build_s = time.process_time() - t0
    labels = server["tree.labels"].numpy().copy()
    route_s = 0.0
    outside = np.setdiff1d(clients, tree_clients)
    for lo in range(0, len(outside), 512):
        block = outside[lo:lo + 512]
        state = _factors(block, layers, noise)
        t0 = time.process_time()
        labels[:, block] = strategy._labels(server, state, block)
        route_s += time.process_time() - t0
    truth = _groups(clients, layers)
    return {"clients": n, "tree clients": len(tree_clients), "build s": build_s, "route s": route_s,
            "counts": server["tree.counts"].tolist(),
            "ARI": [round(adjusted_rand_score(truth[l], labels[l]), 3) for l in range(layers)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1000, 2000, 10000])
    parser.add_argument("--exact-up-to", type=int, default=2000, help="also run tree_clients=0 up to this many")
    parser.add_argument("--tree-clients", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--noise", type=float, default=0.5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print("| clients | tree clients | build (CPU s) | route the rest (CPU s) | cuts | ARI per layer |")
    print("|---:|---:|---:|---:|---|---|")
    for n in args.clients:
        caps = ([0] if n <= args.exact_up_to and n > args.tree_clients else []) + [args.tree_clients]
        for cap in caps:
            m = measure(n, args.layers, cap, args.noise)
            print(f"| {m['clients']} | {m['tree clients']} | {m['build s']:.1f} | {m['route s']:.1f} | "
                  f"{m['counts']} | {m['ARI']} |", flush=True)


if __name__ == "__main__":
    main()

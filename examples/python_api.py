"""Run fedhpc from Python: `fedhpc.run(config, overrides=[...])` returns the run's summary.

    python examples/python_api.py                    # one process, no mpiexec needed
    mpiexec -n 2 python examples/python_api.py       # two ranks share each run: the same numbers
    python examples/python_api.py --out /tmp/api     # where the run directories go (default runs/api)

It sweeps two methods on a small quickstart-style setting (a config given as a dict, overridden
per run) and prints a table on rank 0. A notebook does the same: `import fedhpc; fedhpc.run(...)`.
"""
from __future__ import annotations

import argparse

import fedhpc

SETTING = {  # any key of the YAML configs; what is left out takes its default
    "rounds": 2, "num_clients": 6,
    "data": {"name": "planted", "image_size": 16, "unseen_fraction": 0.2,
             "planted": {"num_clusters": 2, "samples_per_client": 16, "global_test_size": 100}},
    "model": {"kwargs": {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}},
    "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["qkv", "fc1"]},
    "train": {"batch_size": 8, "clients_per_pass": 4, "optimizer": {"name": "adamw", "lr": 0.01}},
}


def main(argv=None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/api", help="folder of the run directories")
    args = parser.parse_args(argv)
    summaries = {}
    for method in ("fedit", "fedsa_lora"):
        summaries[method] = fedhpc.run(SETTING, overrides=[f"strategy.name={method}", f"name={method}",
                                                           f"out_dir={args.out}"], progress=False)
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 0:
        print(f"{'method':<12} {'global':>7} {'personalized':>13} {'MB up':>7}")
        for method, s in summaries.items():
            print(f"{method:<12} {s['global_accuracy'] or float('nan'):>7.4f} {s['personalized_mean']:>13.4f} "
                  f"{s['bytes_up'] / 1e6:>7.3f}")
    return summaries


if __name__ == "__main__":
    main()

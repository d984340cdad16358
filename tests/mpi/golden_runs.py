"""Golden runs: every case of tests/golden/cases.yaml, in one process (one MPI launch).

    # run the cases, write <out>/<case>/{summary.json, metrics.jsonl, client_accuracy.json, ...}
    OMP_NUM_THREADS=1 mpiexec -n 3 python tests/mpi/golden_runs.py --out /tmp/golden-out
    # the same, then compare with the goldens, floats to GOLDEN_RTOL (exit 1 and one line per difference)
    OMP_NUM_THREADS=1 mpiexec -n 3 python tests/mpi/golden_runs.py --out /tmp/golden-out --compare tests/golden
    # (re)record the goldens: on ONE rank first (summary, metrics, client accuracy, mpi_bytes of 1 rank) ...
    OMP_NUM_THREADS=1 python tests/mpi/golden_runs.py --record tests/golden
    # ... then on 2, 3 and 4 ranks, which check everything else against the 1-rank goldens and
    # only add `mpi_bytes` for that rank count (each rank sends its own reduction buffer, so the
    # total MPI bytes grow with the rank count by design)
    OMP_NUM_THREADS=1 mpiexec -n 2 python tests/mpi/golden_runs.py --record tests/golden

`--only a,b` runs those cases, in that order. tests/test_golden.py runs this at 1, 2, 3 and 4
ranks: the 1-rank run must give the goldens to GOLDEN_RTOL, and 2, 3 and 4 ranks the 1-rank run's
numbers bit for bit, every value except the wall-clock fields and `ranks` (IGNORED). Only rank 0
writes. The comparison helpers below import neither torch nor MPI.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"
CASES = GOLDEN / "cases.yaml"
FILES = ("summary.json", "metrics.jsonl", "client_accuracy.json")
WALL_CLOCK = frozenset({"wall_seconds", "round_seconds", "clients_per_second"})
"""Fields that differ from run to run: recorded as null, so that re-recording changes no byte."""
IGNORED = WALL_CLOCK | {"ranks"}
"""Fields not compared: the wall clock, and the rank count itself."""
PER_RANK_COUNT = frozenset({"mpi_bytes"})
"""Fields that depend on the rank count by design: compared with mpi_bytes.json[<ranks>]."""
MPI_BYTES = "mpi_bytes.json"
GOLDEN_RTOL = 1e-4
"""How far (relative) a float may be from its golden. Bit for bit holds on one machine only: another
CPU's matmul kernels round otherwise (an AVX-512 EPYC against the AVX2 one the goldens were recorded
on: 118 floats moved, by up to 7.2e-6 (a train_loss after 3 rounds); no accuracy moved). A change
of method moves far more."""


def load_cases(path: Path = CASES) -> tuple[dict, dict[str, list[str]]]:
    """(base config tree, {case: dotted overrides}) from the cases file."""
    spec = yaml.safe_load(Path(path).read_text())
    return spec["base"], {name: list(overrides) for name, overrides in spec["cases"].items()}


# --- comparison (pure Python) -------------------------------------------------------------
def _same(a, b, rtol: float = 0.0) -> bool:
    """Equal JSON values: same types, floats bit for bit (the sign of zero included) or, given `rtol`,
    within that relative distance; everything else exactly."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        if rtol:
            return math.isclose(a, b, rel_tol=rtol)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y, rtol) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], rtol) for k in a)
    return a == b


def _show(a, b) -> str:
    text = f"golden {a!r}, got {b!r}"
    if isinstance(a, float) and isinstance(b, float) and math.isfinite(a) and math.isfinite(b):
        text += f" (diff {b - a:.3e}, rel {abs(b - a) / max(abs(a), 1e-300):.3e})"
    return text


def _compare_record(where: str, golden: dict, got: dict, skip: frozenset, rtol: float) -> list[str]:
    problems = []
    for key in sorted(golden.keys() - got.keys()):
        problems.append(f"{where}: field {key!r} missing (golden {golden[key]!r})")
    for key in sorted(got.keys() - golden.keys()):
        problems.append(f"{where}: field {key!r} not in the golden (got {got[key]!r})")
    for key in golden.keys() & got.keys():
        if key not in skip and not _same(golden[key], got[key], rtol):
            problems.append(f"{where}: field {key!r}: {_show(golden[key], got[key])}")
    return sorted(problems)


def _read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare_case(case: str, golden_dir: Path, out_dir: Path, *, ranks: int, rtol: float = 0.0,
                 mpi_bytes: Path | None = GOLDEN) -> list[str]:
    """Every difference between a case's outputs in `out_dir/<case>` and those in `golden_dir/<case>`
    (the goldens, or another run), one line each naming the case, the round (or `summary`) and the
    field with both values; `mpi_bytes` against the counts recorded for `ranks` under that folder
    (None: not compared)."""
    golden, got = Path(golden_dir) / case, Path(out_dir) / case
    missing = [str(d / f) for d in (golden, got) for f in FILES if not (d / f).is_file()]
    if missing:
        return [f"{case}: file(s) missing: {', '.join(missing)}"]
    skip = IGNORED | PER_RANK_COUNT
    summary = json.loads((got / "summary.json").read_text())
    problems = _compare_record(f"{case}: summary", json.loads((golden / "summary.json").read_text()), summary,
                               skip, rtol)
    g_lines, o_lines = _read_lines(golden / "metrics.jsonl"), _read_lines(got / "metrics.jsonl")
    if len(g_lines) != len(o_lines):
        problems.append(f"{case}: metrics.jsonl: {len(g_lines)} golden rounds, got {len(o_lines)}")
    for g, o in zip(g_lines, o_lines):
        problems += _compare_record(f"{case}: round {g.get('round')}", g, o, skip, rtol)
    g_acc = json.loads((golden / "client_accuracy.json").read_text())
    o_acc = json.loads((got / "client_accuracy.json").read_text())
    if not _same(g_acc.get("round"), o_acc.get("round")) or not _same(g_acc.get("clients"), o_acc.get("clients")):
        problems.append(f"{case}: client_accuracy.json: round / clients: golden {g_acc.get('round')!r} "
                        f"{g_acc.get('clients')!r}, got {o_acc.get('round')!r} {o_acc.get('clients')!r}")
    else:
        for c, a, b in zip(g_acc["clients"], g_acc["personalized_accuracy"], o_acc["personalized_accuracy"]):
            if not _same(a, b, rtol):
                problems.append(f"{case}: round {g_acc['round']} (client_accuracy.json): client {c}: {_show(a, b)}")
    if mpi_bytes is not None:
        problems += _compare_mpi_bytes(case, Path(mpi_bytes) / case, o_lines, summary, ranks)
    return problems


def _observed_mpi_bytes(lines: list[dict], summary: dict) -> dict:
    return {"metrics": [m.get("mpi_bytes") for m in lines], "summary": summary.get("mpi_bytes")}


def _compare_mpi_bytes(case: str, golden: Path, lines: list[dict], summary: dict, ranks: int) -> list[str]:
    path = golden / MPI_BYTES
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    if str(ranks) not in recorded:
        return [f"{case}: no mpi_bytes recorded for {ranks} rank(s) in {path} "
                f"(record them: mpiexec -n {ranks} python tests/mpi/golden_runs.py --record tests/golden)"]
    want, got = recorded[str(ranks)], _observed_mpi_bytes(lines, summary)
    problems = []
    for i, (a, b) in enumerate(zip(want["metrics"], got["metrics"])):
        if not _same(a, b):
            problems.append(f"{case}: round {i + 1}: field 'mpi_bytes' ({ranks} ranks): {_show(a, b)}")
    if len(want["metrics"]) != len(got["metrics"]):
        problems.append(f"{case}: mpi_bytes ({ranks} ranks): {len(want['metrics'])} golden rounds, "
                        f"got {len(got['metrics'])}")
    if not _same(want["summary"], got["summary"]):
        problems.append(f"{case}: summary: field 'mpi_bytes' ({ranks} ranks): {_show(want['summary'], got['summary'])}")
    return problems


def compare_all(golden_dir: Path, out_dir: Path, *, ranks: int, cases: list[str] | None = None,
                rtol: float = 0.0, mpi_bytes: Path | None = GOLDEN) -> list[str]:
    problems = []
    for case in cases if cases is not None else list(load_cases()[1]):
        problems += compare_case(case, golden_dir, out_dir, ranks=ranks, rtol=rtol, mpi_bytes=mpi_bytes)
    return problems


# --- running (torch, MPI) -----------------------------------------------------------------
def run_cases(base: dict, cases: dict[str, list[str]], names: list[str], out_dir: Path, comm, *,
              say=print) -> dict[str, float]:
    """Run the named cases one after the other in this process; seconds per case."""
    from fedhpc.config import ExperimentConfig
    from fedhpc.configtree import apply_overrides, build
    from fedhpc.experiment import run

    seconds = {}
    for name in names:
        overrides = [*cases[name], f"name={name}", f"out_dir={out_dir}"]
        cfg = build(ExperimentConfig, apply_overrides(base, overrides))
        comm.Barrier()
        t0 = time.perf_counter()
        run(cfg, comm=comm, progress=False)
        seconds[name] = time.perf_counter() - t0
        say(f"golden_runs: {name}: {seconds[name]:.1f} s")
    return seconds


def _no_wall_clock(record: dict) -> dict:
    return {k: None if k in WALL_CLOCK else v for k, v in record.items()}


def _record(golden_dir: Path, out_dir: Path, names: list[str], ranks: int) -> list[str]:
    """Rank 0 only: write the goldens (1 rank) or, on more ranks, check them and add mpi_bytes."""
    if ranks > 1:
        problems = compare_all(golden_dir, out_dir, ranks=ranks, cases=names, mpi_bytes=None)  # same machine: exact
        if problems:
            return problems
    for name in names:
        src, dst = out_dir / name, golden_dir / name
        dst.mkdir(parents=True, exist_ok=True)
        summary = json.loads((src / "summary.json").read_text())
        observed = _observed_mpi_bytes(_read_lines(src / "metrics.jsonl"), summary)
        if ranks == 1:
            (dst / "summary.json").write_text(json.dumps(_no_wall_clock(summary), indent=2) + "\n")
            (dst / "metrics.jsonl").write_text("".join(json.dumps(_no_wall_clock(m)) + "\n"
                                                      for m in _read_lines(src / "metrics.jsonl")))
            shutil.copyfile(src / "client_accuracy.json", dst / "client_accuracy.json")
            recorded = {}  # new 1-rank numbers: the other rank counts must be recorded again
        else:
            recorded = json.loads((dst / MPI_BYTES).read_text()) if (dst / MPI_BYTES).is_file() else {}
        recorded[str(ranks)] = observed
        recorded = {k: recorded[k] for k in sorted(recorded, key=int)}
        (dst / MPI_BYTES).write_text(json.dumps(recorded, indent=1) + "\n")
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=Path, default=CASES, help="cases file (default: tests/golden/cases.yaml)")
    parser.add_argument("--out", type=Path, help="folder for the runs (default with --record: a temporary one)")
    parser.add_argument("--compare", type=Path, metavar="GOLDEN_DIR", help="compare the runs with these goldens (floats to GOLDEN_RTOL)")
    parser.add_argument("--record", type=Path, metavar="GOLDEN_DIR", help="write the goldens (module docstring)")
    parser.add_argument("--only", help="comma-separated case names, run in this order (default: all, file order)")
    args = parser.parse_args(argv)
    if args.out is None and args.record is None:
        parser.error("give --out DIR (and optionally --compare GOLDEN_DIR) or --record GOLDEN_DIR")

    sys.path.insert(0, str(REPO))  # the checkout's fedhpc, whatever is installed
    from mpi4py import MPI

    import fedhpc

    comm = MPI.COMM_WORLD
    root = comm.Get_rank() == 0
    say = (lambda line: print(line, flush=True)) if root else (lambda line: None)
    base, cases = load_cases(args.cases)
    names = args.only.split(",") if args.only else list(cases)
    unknown = [n for n in names if n not in cases]
    if unknown:
        say(f"golden_runs: unknown case(s) {unknown}; cases: {list(cases)}")
        return 2
    temp = None
    if args.out is None:
        temp = comm.bcast(tempfile.mkdtemp(prefix="golden-runs-") if root else None, root=0)
    out_dir = Path(args.out or temp).resolve()
    say(f"golden_runs: {len(names)} case(s) on {comm.Get_size()} rank(s), fedhpc from {Path(fedhpc.__file__).parent}, "
        f"out {out_dir}")
    t0 = time.perf_counter()
    run_cases(base, cases, names, out_dir, comm, say=say)
    say(f"golden_runs: all cases in {time.perf_counter() - t0:.1f} s")
    problems = []
    if root:
        if args.record is not None:
            problems = _record(args.record.resolve(), out_dir, names, comm.Get_size())
            if not problems:
                say(f"golden_runs: recorded {len(names)} case(s) in {args.record} ({comm.Get_size()} rank(s))")
        if args.compare is not None:
            problems += compare_all(args.compare.resolve(), out_dir, ranks=comm.Get_size(), cases=names,
                                    rtol=GOLDEN_RTOL, mpi_bytes=args.compare.resolve())
        for line in problems:
            print(line, flush=True)
        if (args.compare is not None or args.record is not None) and not problems:
            say("golden_runs: no difference")
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    return int(comm.bcast(1 if problems else 0, root=0))


if __name__ == "__main__":
    sys.exit(main())

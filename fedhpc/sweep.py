"""`fedhpc sweep SWEEP.yaml`: fair comparisons of methods over seeds, with each method's learning
rates chosen on tuning seeds and the table computed on the reported seeds only.

    fedhpc sweep configs/sweeps/hilora_latent.yaml              # run every point, then write the table
    fedhpc sweep configs/sweeps/hilora_latent.yaml --dry-run    # list the points (index, state, run dir)
    fedhpc sweep configs/sweeps/hilora_latent.yaml --point 3    # run one point (a Slurm array task)
    fedhpc sweep configs/sweeps/hilora_latent.yaml --table      # the table from the finished points only
    mpiexec -n 4 fedhpc sweep SWEEP.yaml                        # the ranks share every point in turn

A sweep file (every key is checked; a bad one is one line naming it, exit 2):

    name: hilora_latent                 # runs go to <out_dir>/<name>/<option>/<method>/<values>_s<seed>/
    out_dir: runs/sweeps                # (default)
    base: ../hilora.yaml                # the base config, relative to the sweep file
    overrides: [data.planted.teacher=latent]          # on every point
    options:                            # optional: benchmark variants, each a list of overrides
      latent: []
      skewed: [data.planted.label_skew=0.5]
    methods:                            # each method: its own overrides (and tuning changes)
      hilora: {overrides: [strategy.name=hilora, lora.r=2], tune: {ft: {key: strategy.leaf_lr_scale}}}
      fedit: [strategy.name=fedit, lora.r=6]          # a list is short for {overrides: [...]}
    tune:                               # stages, tuned in order on the tuning seeds
      - {name: lr, key: train.optimizer.lr, values: [0.003, 0.01, 0.03], metric: personalized_mean}
      - {name: ft, key: eval.unseen_finetune_lr_scale, values: [1.0, 0.1], metric: unseen_accuracy_finetuned}
    tuning_seeds: [100, 101]
    seeds: [0, 1, 2]                    # reported seeds: the table uses these only
    metrics: [personalized_mean, personalized_p10, unseen_accuracy_finetuned]   # columns; the first is paired
    reference: fedit                    # paired differences against this method, seed by seed

**Tuning.** Stage i tries each of its `values` on every tuning seed, with the earlier stages at
their chosen values and the later ones at their `default` (the first value unless given); the value
with the best mean `metric` over the tuning seeds is chosen (`mode: max`, or `min`; a list of metrics
is averaged; ties go to the earlier value; a point that failed counts as the worst). A method may
change a stage's `key`, `values`, `metric`, `default` or `mode` (`tune: {ft: {...}}`) or drop it
(`tune: {ft: null}`), e.g. HiLoRA's leaf rate `strategy.leaf_lr_scale` where the baselines have
`eval.unseen_finetune_lr_scale`. Each option (benchmark) is tuned on its own. Then every method runs
on the reported `seeds` at its chosen values. Points are named by their values, so a point that two
stages share (stage 2 at its default is stage 1's choice) runs once.

**Running.** Points run one after another in this process (under MPI, all ranks run each point
together); each in its own run directory. A point whose `summary.json` exists is skipped if its
`config.yaml` matches (else one line says so: delete the directory or rename the sweep); one with a
checkpoint but no summary (killed, preempted) resumes from its newest good checkpoint and ends with
the numbers of an uninterrupted run. Stages unlock as their predecessors finish, so a sweep plans again
after each batch. `--dry-run` lists every point known now and freezes the ones left to run in
`<out_dir>/<name>/points.json`; `--point I` runs entry I of that list (a Slurm job array task,
slurm/sweep.sbatch), so indices stay put while the array runs. Submit, wait, `--dry-run` again (the
next stage or the reported seeds), until nothing is left; then `--table`.
A point that raises (e.g. a diverged run) writes `failed.json` and the sweep goes on; under several
ranks only errors that every rank raises together do so (a divergence, a config check), and any other
error ends the sweep on every rank (a rerun skips the finished points). Several sweep
processes may work on one sweep at once (`fedhpc sweep S &` twice): each point is locked while it runs
(`.<point>.lock` beside it) and the others skip it; the last one to finish writes the full table
(or run `--table` at the end).

**The table** (`<out_dir>/<name>/table.md`, also printed): per option, the tuning scores; then per
method the chosen values, mean ± std over the reported seeds of each metric, the paired difference in
the first metric against `reference` (mean ± std of the per-seed differences) with a paired t-test
(`scipy.stats.ttest_rel`, n >= 2) and a Wilcoxon signed-rank test (`scipy.stats.wilcoxon`, n >= 6: below
that its smallest two-sided p-value is >= 0.0625), and the adapter parameters per client counted from
the run's final checkpoint (`count_adapter_params`). Budgets that differ between methods are flagged.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from .configtree import ConfigError, closest

__all__ = ["Sweep", "Stage", "Point", "load_sweep", "plan", "run_sweep", "sweep_table", "paired_stats",
           "count_adapter_params", "mean_std", "main"]

WILCOXON_MIN_N = 6
"""Smallest number of paired seeds for which the Wilcoxon signed-rank p-value is reported: with n
seeds its smallest exact two-sided p-value is 2 / 2^n (0.0625 at n = 5, 0.03125 at n = 6)."""
TOP_KEYS = ("name", "out_dir", "base", "overrides", "options", "methods", "tune", "tuning_seeds", "seeds",
            "metrics", "reference", "title")
METHOD_KEYS = ("overrides", "tune", "label")
STAGE_KEYS = ("name", "key", "values", "metric", "default", "mode")


@dataclass(frozen=True)
class Stage:
    name: str
    key: str
    values: tuple
    metric: tuple[str, ...]
    default: object
    mode: str = "max"


@dataclass
class Method:
    name: str
    overrides: list[str]
    stages: list[Stage]
    label: str = ""


@dataclass
class Sweep:
    path: Path
    name: str
    out: Path
    base: Path
    overrides: list[str]
    options: dict[str, list[str]]
    methods: dict[str, Method]
    tuning_seeds: list[int]
    seeds: list[int]
    metrics: list[str]
    reference: str | None
    title: str = ""


@dataclass
class Point:
    option: str
    method: str
    seed: int
    values: dict
    """stage name -> value, for every stage of the method."""
    phase: str
    """`tune:<stage>` or `report`."""
    run_dir: Path
    overrides: list[str] = field(default_factory=list)
    state: str = "todo"
    """todo | partial (a checkpoint, no summary) | done | failed."""


def _bad(path, message: str) -> ConfigError:
    return ConfigError(f"sweep {path}: {message}")


def _check_keys(path, where: str, data: dict, allowed) -> None:
    for key in data:
        if key not in allowed:
            raise _bad(path, f"unknown key '{where}{key}'{closest(str(key), allowed)}")


def _str_list(path, where: str, value) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise _bad(path, f"'{where}' must be a list of 'a.b=value' overrides, got {value!r}")
    return list(value)


def _int_list(path, where: str, value, *, empty_ok: bool) -> list[int]:
    if value is None:
        value = []
    if (not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                               for v in value) or len(set(value)) < len(value)):
        raise _bad(path, f"'{where}' must be a list of distinct integer seeds >= 0, got {value!r}")
    if not value and not empty_ok:
        raise _bad(path, f"'{where}' must name at least one seed")
    return list(value)


def _stage(path, where: str, data) -> Stage:
    if not isinstance(data, dict):
        raise _bad(path, f"'{where}' must be a mapping with name, key, values, metric")
    _check_keys(path, f"{where}.", data, STAGE_KEYS)
    for key in ("name", "key", "values", "metric"):
        if key not in data:
            raise _bad(path, f"'{where}' needs '{key}'")
    if not isinstance(data["name"], str) or not data["name"].isidentifier():
        raise _bad(path, f"'{where}.name' must be a short identifier such as lr, got {data['name']!r}")
    values = data["values"]
    if not isinstance(values, list) or not values or len(set(map(str, values))) < len(values):
        raise _bad(path, f"'{where}.values' must be a non-empty list of distinct values, got {values!r}")
    metric = data["metric"]
    metric = [metric] if isinstance(metric, str) else metric
    if not isinstance(metric, list) or not metric or not all(isinstance(m, str) for m in metric):
        raise _bad(path, f"'{where}.metric' must be a summary.json key or a list of them, got {data['metric']!r}")
    default = data.get("default", values[0])
    if str(default) not in map(str, values):
        raise _bad(path, f"'{where}.default' {default!r} must be one of values {values}")
    mode = data.get("mode", "max")
    if mode not in ("max", "min"):
        raise _bad(path, f"'{where}.mode' must be max or min, got {mode!r}")
    return Stage(data["name"], str(data["key"]), tuple(values), tuple(metric), default, mode)


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; every problem is a one-line `ConfigError` naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise _bad(path, f"not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise _bad(path, "must hold a mapping at the top level")
    _check_keys(path, "", data, TOP_KEYS)
    for key in ("name", "base", "methods", "seeds"):
        if key not in data:
            raise _bad(path, f"needs '{key}'")
    name = data["name"]
    if not isinstance(name, str) or not name or "/" in name:
        raise _bad(path, f"'name' must be a plain folder name, got {name!r}")
    base = Path(str(data["base"]))
    if not base.is_absolute():
        base = path.parent / base if (path.parent / base).is_file() else base
    if not base.is_file():
        raise _bad(path, f"'base': config file '{data['base']}' not found (relative to the sweep file or here)")
    options = data.get("options") or {"": []}
    if not isinstance(options, dict):
        raise _bad(path, f"'options' must map option names to override lists, got {options!r}")
    for opt in options:
        if not isinstance(opt, str) or "/" in opt:
            raise _bad(path, f"option name {opt!r} must be a plain folder name")
    options = {opt: _str_list(path, f"options.{opt}", v) for opt, v in options.items()}
    stages = data.get("tune") or []
    if not isinstance(stages, list):
        raise _bad(path, "'tune' must be a list of stages {name, key, values, metric}")
    stages = [_stage(path, f"tune[{i}]", s) for i, s in enumerate(stages)]
    if len({s.name for s in stages}) < len(stages):
        raise _bad(path, "'tune' stage names must be distinct")
    methods_raw = data["methods"]
    if not isinstance(methods_raw, dict) or not methods_raw:
        raise _bad(path, "'methods' must map method names to their overrides")
    methods = {}
    for m, spec in methods_raw.items():
        if not isinstance(m, str) or "/" in m or not m:
            raise _bad(path, f"method name {m!r} must be a plain folder name")
        spec = {"overrides": spec} if isinstance(spec, list) or spec is None else spec
        if not isinstance(spec, dict):
            raise _bad(path, f"'methods.{m}' must be a list of overrides or a mapping with overrides, tune")
        _check_keys(path, f"methods.{m}.", spec, METHOD_KEYS)
        changes = spec.get("tune") or {}
        if not isinstance(changes, dict):
            raise _bad(path, f"'methods.{m}.tune' must map stage names to changes (or null to drop a stage)")
        mine = []
        known = {s.name: s for s in stages}
        for sname in changes:
            if sname not in known:
                raise _bad(path, f"'methods.{m}.tune.{sname}' names no stage of 'tune' ({', '.join(known) or 'none'})")
        for s in stages:
            if s.name in changes and changes[s.name] is None:
                continue
            change = changes.get(s.name) or {}
            if not isinstance(change, dict):
                raise _bad(path, f"'methods.{m}.tune.{s.name}' must be a mapping of stage fields or null")
            merged = {"name": s.name, "key": s.key, "values": list(s.values), "metric": list(s.metric),
                      "mode": s.mode, **({"default": s.default} if "values" not in change else {}), **change}
            if "name" in change and change["name"] != s.name:
                raise _bad(path, f"'methods.{m}.tune.{s.name}.name' cannot rename the stage")
            mine.append(_stage(path, f"methods.{m}.tune.{s.name}", merged))
        methods[m] = Method(m, _str_list(path, f"methods.{m}.overrides", spec.get("overrides")), mine,
                            str(spec.get("label") or m))
    metrics = data.get("metrics") or ["personalized_mean"]
    if not isinstance(metrics, list) or not all(isinstance(x, str) for x in metrics):
        raise _bad(path, f"'metrics' must be a list of summary.json keys, got {metrics!r}")
    reference = data.get("reference")
    if reference is not None and reference not in methods:
        raise _bad(path, f"'reference' {reference!r} is not a method; methods: {', '.join(methods)}")
    tuning = _int_list(path, "tuning_seeds", data.get("tuning_seeds"), empty_ok=True)
    seeds = _int_list(path, "seeds", data["seeds"], empty_ok=False)
    if set(tuning) & set(seeds):
        raise _bad(path, f"'tuning_seeds' and 'seeds' must not share a seed: {sorted(set(tuning) & set(seeds))}")
    if any(m.stages for m in methods.values()) and not tuning:
        raise _bad(path, "'tune' needs 'tuning_seeds' (the reported seeds are never used for choosing)")
    out = Path(str(data.get("out_dir") or "runs/sweeps")) / name
    return Sweep(path, name, out, base, _str_list(path, "overrides", data.get("overrides")), options, methods,
                 tuning, seeds, list(metrics), reference, str(data.get("title") or ""))


# ---------------------------------------------------------------------------------------------
# Points


def _fmt(value) -> str:
    return str(value).replace("/", "_").replace(" ", "")


def _point(sweep: Sweep, option: str, method: Method, values: dict, seed: int, phase: str) -> Point:
    tag = "_".join(f"{s.name}{_fmt(values[s.name])}" for s in method.stages) or "base"
    folder = sweep.out / option / method.name if option else sweep.out / method.name
    run_dir = folder / f"{tag}_s{seed}"
    overrides = [*sweep.overrides, *sweep.options[option], *method.overrides,
                 *(f"{s.key}={values[s.name]}" for s in method.stages),
                 f"seed={seed}", f"out_dir={folder}", f"name={run_dir.name}"]
    return Point(option, method.name, seed, dict(values), phase, run_dir, overrides)


def _state(point: Point) -> str:
    if (point.run_dir / "summary.json").is_file():
        return "done"
    if (point.run_dir / "failed.json").is_file():
        return "failed"
    if any((point.run_dir / "checkpoints").glob("round-*.h5")):
        return "partial"
    return "todo"


def _summary(point: Point) -> dict | None:
    """The point's summary (None if it failed)."""
    if point.state == "failed":
        return None
    return json.loads((point.run_dir / "summary.json").read_text())


def _score(summary: dict | None, stage: Stage, where: str) -> float:
    if summary is None:
        return -math.inf if stage.mode == "max" else math.inf
    values = []
    for metric in stage.metric:
        if metric not in summary:
            raise ConfigError(f"{where}: metric '{metric}' is not in summary.json (keys: "
                              f"{', '.join(k for k, v in summary.items() if isinstance(v, (int, float)))})")
        value = summary[metric]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise ConfigError(f"{where}: metric '{metric}' is null for this method; choose another "
                              f"(methods.<name>.tune.<stage>.metric)")
        values.append(float(value))
    return float(np.mean(values))


@dataclass
class Plan:
    points: list[Point]
    """Every point known now, in run order (done ones included)."""
    choices: dict
    """(option, method) -> {stage: chosen value} once every stage is chosen."""
    scores: dict
    """(option, method) -> {stage: [(value, mean score over the tuning seeds, failed seeds)]}."""
    waiting: list[str]
    """Stages and reports that wait for earlier points."""


def plan(sweep: Sweep) -> Plan:
    """The points that can be named now: each method's stages in order as their predecessors finish,
    then the reported seeds at the chosen values. Reads the run directories' state."""
    points, by_dir, choices, scores, waiting = [], {}, {}, {}, []

    def add(p: Point) -> Point:
        if p.run_dir not in by_dir:
            p.state = _state(p)
            by_dir[p.run_dir] = p
            points.append(p)
        return by_dir[p.run_dir]

    for option in sweep.options:
        for method in sweep.methods.values():
            chosen, ready = {}, True
            scores[(option, method.name)] = {}
            for i, stage in enumerate(method.stages):
                fixed = {s.name: chosen.get(s.name, s.default) for s in method.stages}
                trials = {v: [add(_point(sweep, option, method, {**fixed, stage.name: v}, seed, f"tune:{stage.name}"))
                              for seed in sweep.tuning_seeds] for v in stage.values}
                if any(p.state not in ("done", "failed") for ps in trials.values() for p in ps):
                    later = [s.name for s in method.stages[i + 1:]] + ["report"]
                    waiting.append(f"{option + '/' if option else ''}{method.name}: {', '.join(later)} after stage {stage.name}")
                    ready = False
                    break
                where = f"sweep {sweep.path}: method {method.name}, stage {stage.name}"
                table = []
                for v, ps in trials.items():
                    table.append((v, float(np.mean([_score(_summary(p), stage, where) for p in ps])),
                                  sum(p.state == "failed" for p in ps)))
                pick = (max if stage.mode == "max" else min)(table, key=lambda row: row[1])
                chosen[stage.name] = pick[0]
                scores[(option, method.name)][stage.name] = table
            if ready:
                values = {s.name: chosen.get(s.name, s.default) for s in method.stages}
                choices[(option, method.name)] = values
                for seed in sweep.seeds:
                    add(_point(sweep, option, method, values, seed, "report"))
    return Plan(points, choices, scores, waiting)


# ---------------------------------------------------------------------------------------------
# Running


def _requested(sweep: Sweep, point: Point):
    from .api import resolve_config

    try:
        return resolve_config(sweep.base, point.overrides)
    except ValueError as err:
        raise ConfigError(f"sweep {sweep.path}: point {point.run_dir}: {str(err).splitlines()[0]}") from None


def _check_finished(sweep: Sweep, point: Point, cfg) -> None:
    """A finished point must have been run with this point's config (else the sweep file changed)."""
    from .configtree import to_dict
    from .io.checkpoint import CheckpointError
    from .io.checkpoint.resume import resume_config

    stored_file = point.run_dir / "config.yaml"
    if not stored_file.is_file():
        return
    stored, requested = yaml.safe_load(stored_file.read_text()), to_dict(cfg)
    problem = None
    if stored.get("rounds") != requested["rounds"]:
        problem = f"rounds: {requested['rounds']} but the finished run has {stored.get('rounds')}"
    else:
        try:
            resume_config(stored, requested, saved_round=0)
        except CheckpointError as err:
            problem = str(err).split(";")[0]
    if problem:
        raise ConfigError(f"sweep {sweep.path}: {point.run_dir} holds a finished run with another config "
                          f"({problem}); delete that folder or rename the sweep")


def run_point(sweep: Sweep, point: Point, *, comm, guard=None, say=print, cfg=None) -> None:
    """Run (or resume) one point on the ranks of `comm`; a finished one is checked and skipped, one
    that another sweep process holds (a lock file next to its run directory) is skipped. `cfg`: the
    point's resolved config if the caller has it (else resolved here)."""
    cfg = _requested(sweep, point) if cfg is None else cfg
    if point.state in ("done", "failed"):
        if comm.Get_rank() == 0:
            _check_finished(sweep, point, cfg)
        return
    lock = None
    if comm.Get_rank() == 0:  # another sweep process (a second worker, an array task) may hold the point
        import fcntl

        point.run_dir.parent.mkdir(parents=True, exist_ok=True)
        lock = open(point.run_dir.parent / f".{point.run_dir.name}.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            lock = None
        else:  # it may have finished while we planned
            point.state = _state(point)
    busy, point.state = comm.bcast((lock is None, point.state) if comm.Get_rank() == 0 else None, root=0)
    if busy or point.state in ("done", "failed"):
        if busy:
            say(f"fedhpc sweep: {point.run_dir}: another sweep process is running it; skipped")
        if lock is not None:
            lock.close()
        return
    try:
        _run_locked(sweep, point, cfg, comm=comm, guard=guard, say=say)
    finally:
        if lock is not None:
            lock.close()


def _run_locked(sweep: Sweep, point: Point, cfg, *, comm, guard, say) -> None:
    from .config import ExperimentConfig
    from .configtree import build, to_dict
    from .experiment import run as run_experiment
    from .io.checkpoint import find_resumable, read_config, saved_round
    from .io.checkpoint.resume import resume_config

    resume = find_resumable(point.run_dir, comm=comm, say=say) if point.state == "partial" else None
    if resume is not None:
        cfg = build(ExperimentConfig, resume_config(read_config(resume), to_dict(cfg), saved_round=saved_round(resume)))
        say(f"fedhpc sweep: {point.run_dir}: resuming from {resume.name}")
    else:
        say(f"fedhpc sweep: {point.run_dir}: running ({point.phase})")
    try:
        run_experiment(cfg, comm=comm, progress=False, resume=resume, guard=guard)
    except (ValueError, FloatingPointError) as err:
        if comm.Get_size() > 1 and not isinstance(err, (FloatingPointError, ConfigError)):
            raise  # may be this rank's alone while the others wait in a collective: the guard aborts them
        # one rank, or an error every rank raises together (a divergence, a config check): record it, go on
        if comm.Get_rank() == 0:
            point.run_dir.mkdir(parents=True, exist_ok=True)
            (point.run_dir / "failed.json").write_text(json.dumps({"error": str(err).splitlines()[0]}) + "\n")
        say(f"fedhpc sweep: {point.run_dir}: failed: {str(err).splitlines()[0]}")
        return
    point.state = "done"


def run_sweep(sweep: Sweep, *, comm, guard=None, say=print, configs: dict | None = None) -> Plan:
    """Run every point, planning again as stages finish (later stages and the reported seeds unlock);
    returns the plan after the last point. `configs`: run directory -> resolved config of the points
    the caller has resolved already."""
    handled = set()
    while True:
        current = comm.bcast(plan(sweep) if comm.Get_rank() == 0 else None, root=0)
        pending = [p for p in current.points if p.run_dir not in handled]
        if not pending:  # nothing new unlocked: every stage and report that can run has run
            return current
        for p in pending:  # finished ones are only checked against their config
            run_point(sweep, p, comm=comm, guard=guard, say=say, cfg=(configs or {}).get(p.run_dir))
            handled.add(p.run_dir)


# ---------------------------------------------------------------------------------------------
# Budgets and statistics


def count_adapter_params(run_dir: str | Path) -> list[int]:
    """Adapter parameters of each seen client's personalized model, from the run's newest checkpoint:
    the adapters the method evaluates the client with (`strategy.configure_evaluate`), counted as
    `rank x (d_in + d_out)` per LoRA pair at the client's own rank (a heterogeneous-rank run's
    padding is not counted; tiers concatenated along the rank count in full; a two-expert mixture
    counts both experts), a dense residual (`base_delta`) of rank q as q x (d_in + d_out), at most d_out x d_in, and every entry of
    factored updates (`update_A/B`). The classifier head is not counted (every method trains the
    same head)."""
    import torch
    from mpi4py import MPI

    from .assemble import assemble
    from .config import ExperimentConfig
    from .configtree import build
    from .io.checkpoint import find_resumable, load, read_config
    from .io.export import _fold_mixtures

    comm = MPI.COMM_SELF
    path = find_resumable(run_dir, comm=comm, say=lambda line: None)
    if path is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to count the adapters from (checkpoint.every > 0)")
    cfg = build(ExperimentConfig, {**read_config(path), "device": "cpu"})
    r = assemble(cfg, comm)
    ids = np.setdiff1d(np.arange(cfg.num_clients), np.asarray(r.data.unseen, dtype=np.int64))
    saved = load(path, clients=np.arange(cfg.num_clients), device="cpu")  # every row: a contiguous block
    state = {k: v[torch.as_tensor(ids)] for k, v in saved.clients.items()}
    adapters = r.strategy.configure_evaluate(saved.server, state, ids)
    modules = sorted({k.rsplit(".", 1)[0] for k in adapters if k.endswith((".lora_A", ".expert_A"))})
    adapters = _fold_mixtures(adapters, modules)
    ranks = r.ranks.of(ids).numpy() if cfg.lora.ranks else None
    counts = np.zeros(len(ids), dtype=np.int64)
    for key, t in adapters.items():
        module, leaf = key.rsplit(".", 1) if "." in key else (key, key)
        if leaf == "lora_A":
            rank = t.shape[1]
            d = t.shape[2] + adapters[f"{module}.lora_B"].shape[1]
            counts += (np.minimum(ranks, rank) if ranks is not None else rank) * d
        elif leaf == "base_delta":  # a residual of rank q costs what a rank-q LoRA pair costs, at most the dense matrix
            d_out, d_in = t.shape[1:]
            q = torch.linalg.matrix_rank(t.double(), rtol=1e-7).numpy()
            counts += np.minimum(q * (d_in + d_out), d_out * d_in) if t.shape[0] == len(ids) else \
                int(min(int(q[0]) * (d_in + d_out), d_out * d_in))
        elif leaf in ("update_A", "update_B"):
            counts += int(np.prod(t.shape[1:]))
    return [int(c) for c in counts]


def _budget(point: Point) -> list[int] | None:
    """Cached per-client adapter counts of a finished point (`adapter_budget.json` in its run dir)."""
    cache = point.run_dir / "adapter_budget.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    if point.state != "done":
        return None
    counts = count_adapter_params(point.run_dir)
    cache.write_text(json.dumps(counts) + "\n")
    return counts


def paired_stats(values: list[float], reference: list[float]) -> dict:
    """Paired comparison over seeds: mean and sample std of the differences, the paired t-test's
    p-value (n >= 2, differences not all equal to 1e-12) and the Wilcoxon signed-rank p-value (n >= WILCOXON_MIN_N,
    not all differences zero); NaN where not defined."""
    from scipy import stats

    a, b = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    d = a - b
    n = len(d)
    out = {"n": n, "mean": float(d.mean()) if n else math.nan,
           "std": float(d.std(ddof=1)) if n > 1 else math.nan, "t_p": math.nan, "wilcoxon_p": math.nan}
    if n >= 2 and np.ptp(d) > 1e-12 * max(1.0, float(np.abs(d).max())):  # equal differences: no variance
        out["t_p"] = float(stats.ttest_rel(a, b).pvalue)
    if n >= WILCOXON_MIN_N and np.any(d != 0):
        out["wilcoxon_p"] = float(stats.wilcoxon(a, b).pvalue)
    return out


def mean_std(values: list[float], digits: int = 3) -> str:
    """A table cell: mean ± sample std (ddof 1) of the values that are not None / NaN; one value alone;
    – for none; counts of 1000 or more (bytes) as whole numbers."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "–"
    if np.abs(values).max() >= 1000:  # counts such as bytes: whole numbers
        spread = np.std(values, ddof=1) if len(values) > 1 else 0.0
        return f"{np.mean(values):,.0f}" + (f" ± {spread:,.0f}" if spread else "")
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def _p(p: float) -> str:
    return "–" if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def _budget_cell(counts: list[int] | None) -> str:
    if not counts:
        return "–"
    lo, hi = min(counts), max(counts)
    return f"{lo:,}" if lo == hi else f"{np.mean(counts):,.0f} ({lo:,}–{hi:,})"


def sweep_table(sweep: Sweep, current: Plan, *, budgets: bool = True) -> str:
    """The markdown tables of the finished points (reported seeds only in the results)."""
    lines = [f"# {sweep.title or sweep.name}", "",
             f"Sweep file `{sweep.path}`; tuning seeds {sweep.tuning_seeds or '–'}, reported seeds {sweep.seeds}. "
             f"Mean ± std over the reported seeds."]
    by_key = {(p.option, p.method, p.seed): p for p in current.points if p.phase == "report"}
    for option in sweep.options:
        if option:
            lines += ["", f"## {option}", "", f"Overrides: `{' '.join(sweep.options[option]) or '(none)'}`"]
        stages = [m for m in sweep.methods.values() if m.stages]
        if stages and sweep.tuning_seeds:
            lines += ["", f"Tuning (mean over tuning seeds {sweep.tuning_seeds}; chosen in bold):", "",
                      "| method | stage | key | metric | value: score |", "|---|---|---|---|---|"]
            for m in stages:
                got = current.scores.get((option, m.name), {})
                for s in m.stages:
                    if s.name not in got:
                        lines.append(f"| {m.label} | {s.name} | `{s.key}` | {'+'.join(s.metric)} | (waiting) |")
                        continue
                    pick = current.choices.get((option, m.name), {}).get(s.name)
                    cells = []
                    for v, score, failed in got[s.name]:
                        text = f"{v}: {score:.3f}" + (f" ({failed} failed)" if failed else "")
                        cells.append(f"**{text}**" if str(v) == str(pick) else text)
                    lines.append(f"| {m.label} | {s.name} | `{s.key}` | {'+'.join(s.metric)} | {', '.join(cells)} |")
        results, counts = {}, {}
        for m in sweep.methods.values():
            runs = {}
            for seed in sweep.seeds:
                p = by_key.get((option, m.name, seed))
                if p is not None and p.state == "done":
                    runs[seed] = _summary(p)
            results[m.name] = runs
            first = next((by_key[(option, m.name, s)] for s in sweep.seeds if (option, m.name, s) in by_key
                          and by_key[(option, m.name, s)].state == "done"), None)
            counts[m.name] = _budget(first) if (budgets and first is not None) else None
        primary = sweep.metrics[0]
        ref = sweep.reference
        head = ["method", "chosen", "seeds", *sweep.metrics]
        if ref:
            head += [f"Δ {primary} vs {ref}", "paired t p", "Wilcoxon p"]
        head += ["adapter params / client"]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in sweep.methods.values():
            runs = results[m.name]
            choice = current.choices.get((option, m.name))
            chosen = ", ".join(f"{s.name} {choice[s.name]}" for s in m.stages) if choice is not None else "(waiting)"
            row = [m.label, chosen or "–", f"{len(runs)}/{len(sweep.seeds)}",
                   *(mean_std([r.get(k) for r in runs.values()]) for k in sweep.metrics)]
            if ref:
                base = results[ref]
                common = [s for s in sweep.seeds if s in runs and s in base
                          and runs[s].get(primary) is not None and base[s].get(primary) is not None]
                if m.name == ref or not common:
                    row += ["–", "–", "–"]
                else:
                    st = paired_stats([runs[s][primary] for s in common], [base[s][primary] for s in common])
                    diff = f"{st['mean']:+.3f}" + (f" ± {st['std']:.3f}" if st["n"] > 1 else "")
                    row += [diff, _p(st["t_p"]), _p(st["wilcoxon_p"])]
            row.append(_budget_cell(counts[m.name]))
            lines.append("| " + " | ".join(row) + " |")
        known = {m: c for m, c in counts.items() if c}
        if len({tuple(c) for c in known.values()}) > 1:
            lines += ["", "**Budget mismatch:** the methods' personalized adapters differ in size per client (" +
                      "; ".join(f"{sweep.methods[m].label} {_budget_cell(c)}" for m, c in known.items()) + ")."]
        elif known:
            lines += ["", "Budgets: every method's personalized adapter has the same parameter count per client."]
    if current.waiting:
        lines += ["", "Waiting: " + "; ".join(current.waiting)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Command line


def main(args, comm, guard=None) -> int:
    """`fedhpc sweep` (cli.py parses the arguments)."""
    sweep = load_sweep(args.sweep)
    rank0 = comm.Get_rank() == 0
    say = (lambda line: print(line, flush=True)) if rank0 else (lambda line: None)
    current = comm.bcast(plan(sweep) if rank0 else None, root=0)
    # every point's config is checked before anything runs, each resolved once (run_point is given it)
    configs = {p.run_dir: _requested(sweep, p) for p in current.points}
    frozen = sweep.out / "points.json"
    if args.dry_run:
        if rank0:
            left = [p for p in current.points if p.state in ("todo", "partial")]
            for p in current.points:
                index = f"{left.index(p):4d}" if p in left else "   -"
                print(f"{index}  {p.state:8s}  {p.phase:12s}  {p.run_dir}  {' '.join(p.overrides[:-2])}")
            sweep.out.mkdir(parents=True, exist_ok=True)
            frozen.write_text(json.dumps([str(p.run_dir) for p in left], indent=0) + "\n")
            print(f"{len(current.points)} points known now, {len(left)} to run (--point 0..{len(left) - 1}, "
                  f"listed in {frozen})" + (f"; waiting: {'; '.join(current.waiting)}" if current.waiting else ""))
        return 0
    if args.point is not None:  # a Slurm array task: point I of the list the last --dry-run froze
        if not frozen.is_file():
            raise ConfigError(f"--point: run `fedhpc sweep {sweep.path} --dry-run` first (it writes {frozen})")
        listed = json.loads(frozen.read_text())
        if not 0 <= args.point < len(listed):
            raise ConfigError(f"--point {args.point}: {frozen} lists {len(listed)} points (0-based)")
        match = [p for p in current.points if str(p.run_dir) == listed[args.point]]
        if not match:
            raise ConfigError(f"--point {args.point}: {listed[args.point]} is not a point of the sweep now "
                              f"(the sweep file changed?); run --dry-run again")
        run_point(sweep, match[0], comm=comm, guard=guard, say=say, cfg=configs[match[0].run_dir])
        return 0
    if not args.table:
        current = run_sweep(sweep, comm=comm, guard=guard, say=say, configs=configs)
    if rank0:
        text = sweep_table(sweep, current)
        sweep.out.mkdir(parents=True, exist_ok=True)
        (sweep.out / "table.md").write_text(text)
        print(text, end="")
    return 0

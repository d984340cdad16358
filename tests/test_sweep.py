"""`fedhpc sweep` (fedhpc/sweep.py): bad sweep files, lr selection on tuning seeds only, paired
statistics against an independent computation, adapter budgets against a hand count, skipping and
resuming a killed point (the table equals an uninterrupted sweep's)."""
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from fedhpc.configtree import ConfigError
from fedhpc.sweep import count_adapter_params, load_sweep, paired_stats, plan, sweep_table

from conftest import REPO, TINY

BASE = str(REPO / "configs" / "quickstart.yaml")
SWEEP_TINY = [*TINY, "data.planted.teacher=latent", "rounds=3"]


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _sweep_dict(out: Path, **extra) -> dict:
    data = {
        "name": "t", "out_dir": str(out), "base": BASE, "overrides": list(SWEEP_TINY),
        "methods": {"fedit": ["strategy.name=fedit"],
                    "fedsa": {"overrides": ["strategy.name=fedsa_lora"], "tune": {"lr": None}}},
        "tune": [{"name": "lr", "key": "train.optimizer.lr", "values": [0.01, 0.03], "metric": "personalized_mean"}],
        "tuning_seeds": [100], "seeds": [0, 1], "metrics": ["personalized_mean", "global_accuracy"],
        "reference": "fedit",
    }
    data.update(extra)
    return data


@pytest.mark.parametrize("change, named", [
    ({"metods": {}}, "metods"),
    ({"seeds": [0, 0]}, "seeds"),
    ({"seeds": []}, "seeds"),
    ({"tuning_seeds": [0, 5]}, "tuning_seeds"),
    ({"reference": "fedavg"}, "reference"),
    ({"base": "nowhere.yaml"}, "base"),
    ({"overrides": ["rounds"]}, "overrides"),
    ({"tune": [{"name": "lr", "key": "train.optimizer.lr", "values": [], "metric": "x"}]}, "tune[0].values"),
    ({"tune": [{"name": "lr", "key": "k", "values": [1], "metric": "m", "default": 2}]}, "tune[0].default"),
    ({"methods": {"fedit": {"overrides": [], "tune": {"ft": None}}}}, "methods.fedit.tune.ft"),
    ({"methods": {"fedit": {"overides": []}}}, "methods.fedit.overides"),
    ({"tuning_seeds": []}, "tuning_seeds"),
])
def test_bad_sweep_file_is_one_line_naming_the_key(tmp_path, change, named):
    path = _write(tmp_path / "s.yaml", _sweep_dict(tmp_path, **change))
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    message = str(err.value)
    assert "\n" not in message and named in message, message


def test_bad_point_override_and_cli_exit_code(tmp_path, capsys):
    from fedhpc.cli import main

    path = _write(tmp_path / "s.yaml", _sweep_dict(tmp_path, methods={"fedit": ["strategy.nmae=fedit"]}, tune=[],
                                                   tuning_seeds=[], reference=None))
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "strategy.nmae" in err, err
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    assert main(["sweep", str(tmp_path / "broken.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def _exact_wilcoxon_p(d: np.ndarray) -> float:
    """Two-sided exact signed-rank p-value by enumerating every sign pattern (no ties, no zeros)."""
    ranks = stats.rankdata(np.abs(d))
    w = ranks[d > 0].sum()
    total = ranks.sum()
    null = np.array([sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=len(d))])
    lo = min(w, total - w)
    return min(1.0, 2 * float(np.mean(null <= lo + 1e-9)))


def test_paired_stats_against_independent_formulas():
    rng = np.random.default_rng(3)
    for n in (3, 6, 8):
        a = rng.normal(0.6, 0.05, n)
        b = a - rng.normal(0.02, 0.03, n)
        got = paired_stats(list(a), list(b))
        d = a - b
        t = d.mean() / (d.std(ddof=1) / np.sqrt(n))
        assert got["mean"] == pytest.approx(d.mean(), abs=1e-15)
        assert got["std"] == pytest.approx(d.std(ddof=1), rel=1e-12)
        assert got["t_p"] == pytest.approx(2 * stats.t.sf(abs(t), n - 1), rel=1e-9)
        if n >= 6:
            assert got["wilcoxon_p"] == pytest.approx(_exact_wilcoxon_p(d), rel=1e-9)
        else:
            assert np.isnan(got["wilcoxon_p"])
    same = paired_stats([0.5, 0.6, 0.7], [0.4, 0.5, 0.6])  # equal differences: no t-test
    assert same["mean"] == pytest.approx(0.1) and np.isnan(same["t_p"])


def _fake(run_dir: Path, **metrics) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(metrics))


def test_lr_chosen_on_tuning_seeds_and_table_on_reported_seeds_only(tmp_path):
    """Hand-written summaries: lr 0.03 wins on the tuning seeds although lr 0.01 would win on the
    reported seeds; the table reports lr 0.03's reported-seed runs and nothing else."""
    sweep = load_sweep(_write(tmp_path / "s.yaml", _sweep_dict(tmp_path, tuning_seeds=[100, 101], seeds=[0, 1, 2])))
    root = tmp_path / "t"
    tuning = {0.01: [0.40, 0.50], 0.03: [0.60, 0.45]}  # means 0.45 vs 0.525
    for lr, values in tuning.items():
        for seed, v in zip((100, 101), values):
            _fake(root / "fedit" / f"lr{lr}_s{seed}", personalized_mean=v, global_accuracy=0.9)
    first = plan(sweep)
    assert first.choices[("", "fedit")] == {"lr": 0.03}
    assert [p.run_dir.name for p in first.points if p.method == "fedit" and p.phase == "report"] == \
        ["lr0.03_s0", "lr0.03_s1", "lr0.03_s2"]
    reported = {0: 0.70, 1: 0.72, 2: 0.77}
    for seed, v in reported.items():
        _fake(root / "fedit" / f"lr0.03_s{seed}", personalized_mean=v, global_accuracy=0.5)
        _fake(root / "fedit" / f"lr0.01_s{seed}", personalized_mean=0.99, global_accuracy=0.99)  # not chosen
        _fake(root / "fedsa" / f"base_s{seed}", personalized_mean=v + 0.01 * (seed + 1), global_accuracy=None)
    text = sweep_table(sweep, plan(sweep), budgets=False)
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("| fed")}
    values = list(reported.values())
    assert rows["fedit"][1] == "lr 0.03" and rows["fedit"][2] == "3/3"
    assert rows["fedit"][3] == f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"
    assert rows["fedit"][4] == "0.500 ± 0.000"
    diff = paired_stats([v + 0.01 * (s + 1) for s, v in reported.items()], values)
    assert rows["fedsa"][5] == f"{diff['mean']:+.3f} ± {diff['std']:.3f}"
    assert rows["fedsa"][6] == f"{diff['t_p']:.3f}"
    assert rows["fedsa"][4] == "–"  # fedsa_lora has no global model
    assert "0.990" not in text and "0.525" in text  # the unchosen runs and the tuning scores stay apart


def test_budget_counts_by_hand(tmp_path):
    """(FedIT at r = 4, 2,304 per client, is checked in the sweep test's table.) TINY's ViT: 2 blocks, width 32; LoRA on qkv (32 -> 96) and fc1 (32 -> 128): one unit of
    rank costs (32 + 96) + (32 + 128) = 288 parameters per block, 576 for the model."""
    import fedhpc

    per_rank = 2 * ((32 + 96) + (32 + 128))
    runs = {
        "hilora_r2": (["strategy.name=hilora", "lora.r=2", "strategy.root_rounds=1", "strategy.cluster_rounds=1"],
                      [3 * 2 * per_rank] * 6),  # root + cluster + leaf tiers at rank 2
        "fedit_ranks": (["strategy.name=fedit", "lora.r=4", "lora.ranks=[2, 4]"], None),
        # ILoRA re-bases the frozen weight: W0 - c B A, a rank-4 residual, on top of the rank-4 LoRA
        "ilora_r4": (["strategy.name=ilora", "lora.r=4"], [(4 + 4) * per_rank] * 6),
    }
    for name, (overrides, expected) in runs.items():
        fedhpc.run(BASE, [*SWEEP_TINY, f"out_dir={tmp_path}", f"name={name}", *overrides], progress=False)
        counts = count_adapter_params(tmp_path / name)
        if expected is None:  # each client at its own rank, the padding not counted
            cfg = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
            assert sorted(set(counts)) == [2 * per_rank, 4 * per_rank] and len(counts) == 6, counts
            assert cfg["lora"]["ranks"] == [2, 4]
        else:
            assert counts == expected, (name, counts)


def _sweep_cmd(path: Path) -> list[str]:
    return [sys.executable, "-m", "fedhpc", "sweep", str(path)]


def _table(out: Path) -> str:
    return "\n".join(line for line in (out / "t" / "table.md").read_text().splitlines()
                     if not line.startswith("Sweep file"))


@pytest.mark.slow  # about 5 min on the shared 2-core machine under load (12 tiny runs, 4 processes)
def test_sweep_skips_finished_points_and_resumes_a_killed_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    clean = _write(tmp_path / "clean.yaml", _sweep_dict(tmp_path / "clean", seeds=[0]))
    done = subprocess.run(_sweep_cmd(clean), capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("running (") == 4  # fedit: 2 lr x 1 tuning seed + 1 seed; fedsa: 1 seed

    # A second sweep: SIGKILL while its first point holds after round 2 (round 1's checkpoint on disk).
    killed = _write(tmp_path / "killed.yaml", _sweep_dict(tmp_path / "killed", seeds=[0]))
    first = tmp_path / "killed" / "t" / "fedit" / "lr0.01_s100"
    proc = subprocess.Popen(_sweep_cmd(killed), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**env, "FEDHPC_HOLD_AFTER_ROUND": "2"}, cwd=REPO)
    deadline = time.monotonic() + 240
    for line in proc.stdout:
        if "holding after round 2" in line or time.monotonic() > deadline:
            break
    while not (first / "checkpoints" / "round-000001.h5").is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (first / "summary.json").exists() and (first / "checkpoints" / "round-000001.h5").is_file()
    again = subprocess.run(_sweep_cmd(killed), capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{first}: resuming from round-00000" in again.stdout
    assert _table(tmp_path / "clean") == _table(tmp_path / "killed")
    rows = [line for line in _table(tmp_path / "clean").splitlines() if line.startswith("| fed") and "1/1" in line]
    assert len(rows) == 2 and all(line.endswith("| 2,304 |") for line in rows), rows
    assert rows[1].startswith("| fedsa | – | 1/1")  # r = 4 x 2 blocks x (128 + 160), by hand
    for a, b in [(tmp_path / "clean" / "t" / "fedit" / "lr0.01_s100", first)]:
        strip = lambda s: {k: v for k, v in json.loads(s).items() if "wall" not in k and "seconds" not in k}  # noqa: E731
        assert strip((a / "summary.json").read_text()) == strip((b / "summary.json").read_text())

    # Finished points are skipped.
    stamp = (first / "summary.json").stat().st_mtime_ns
    third = subprocess.run(_sweep_cmd(killed), capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert third.returncode == 0 and "running (" not in third.stdout and "resuming" not in third.stdout
    assert (first / "summary.json").stat().st_mtime_ns == stamp


def test_unseen_finetune_lr_scale_scales_only_the_finetuning(tmp_path, monkeypatch):
    """eval.unseen_finetune_lr_scale (the baselines' fine-tuning rate, tuned by the sweep) reaches the
    optimizer of the unseen clients' fine-tuning only; training keeps train.optimizer.lr."""
    import fedhpc
    import fedhpc.clients as clients

    used, real = [], clients.StackedOptimizer
    monkeypatch.setattr(clients, "StackedOptimizer", lambda cfg: used.append(cfg.lr) or real(cfg))
    fedhpc.run(BASE, [*SWEEP_TINY, "rounds=1", f"out_dir={tmp_path}", "train.optimizer.lr=0.02",
                      "eval.unseen_finetune_lr_scale=0.25"], progress=False)
    assert sorted(set(used)) == [pytest.approx(0.005), 0.02], used


def test_dry_run_freezes_the_points_left_and_point_indexes_them(tmp_path, capsys):
    from fedhpc.cli import main

    path = _write(tmp_path / "s.yaml", _sweep_dict(tmp_path))
    root = tmp_path / "t"
    for lr, v in ((0.01, 0.3), (0.03, 0.4)):
        _fake(root / "fedit" / f"lr{lr}_s100", personalized_mean=v)
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = json.loads((root / "points.json").read_text())
    assert listed == [str(root / "fedit" / "lr0.03_s0"), str(root / "fedit" / "lr0.03_s1"),
                      str(root / "fedsa" / "base_s0"), str(root / "fedsa" / "base_s1")]
    assert "6 points known now, 4 to run" in out
    assert main(["sweep", str(path), "--point", "4"]) == 2
    assert "lists 4 points" in capsys.readouterr().err


def test_a_finished_point_with_another_config_is_one_line(tmp_path, capsys):
    """The sweep file changed under a finished point (same folder, other config): exit 2, one line."""
    from fedhpc.api import resolve_config
    from fedhpc.cli import main
    from fedhpc.configtree import to_dict

    path = _write(tmp_path / "s.yaml", _sweep_dict(tmp_path))
    first = plan(load_sweep(path)).points[0]
    old = to_dict(resolve_config(BASE, [*first.overrides, "train.local_epochs=3"]))
    _fake(first.run_dir, personalized_mean=0.5)
    (first.run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another config" in err and "train.local_epochs" in err, err
    assert not (tmp_path / "t" / "fedit" / "lr0.03_s100").exists()  # nothing ran


def test_a_half_finished_point_resumes_and_the_rest_is_skipped(tmp_path, capsys):
    """In-process and cheap (the slow test above kills a real process): a copy of a finished sweep
    whose first point lost its summary and last checkpoint (as a run killed after round 2 leaves
    it) resumes that point alone, and its table and summary equal the uninterrupted sweep's."""
    import shutil

    from fedhpc.cli import main

    one = {"methods": {"fedit": ["strategy.name=fedit"]}, "seeds": [0], "reference": None}
    assert main(["sweep", str(_write(tmp_path / "a.yaml", _sweep_dict(tmp_path / "a", **one)))]) == 0
    assert capsys.readouterr().out.count("running (") == 3
    shutil.copytree(tmp_path / "a" / "t", tmp_path / "b" / "t")
    (tmp_path / "b" / "t" / "table.md").unlink()
    half = tmp_path / "b" / "t" / "fedit" / "lr0.01_s100"
    (half / "summary.json").unlink()
    (half / "checkpoints" / "round-000003.h5").unlink()
    assert main(["sweep", str(_write(tmp_path / "b.yaml", _sweep_dict(tmp_path / "b", **one)))]) == 0
    out = capsys.readouterr().out
    assert out.count("resuming from round-000002.h5") == 1 and "running (" not in out, out
    assert _table(tmp_path / "a") == _table(tmp_path / "b")
    strip = lambda p: {k: v for k, v in json.loads(p.read_text()).items() if "wall" not in k}  # noqa: E731
    assert strip(half / "summary.json") == strip(tmp_path / "a" / "t" / "fedit" / "lr0.01_s100" / "summary.json")


class _Ranks:
    """A communicator stand-in of `size` ranks seen from rank 0 (the failure rule needs only these)."""

    def __init__(self, size):
        self.size = size

    def Get_rank(self):
        return 0

    def Get_size(self):
        return self.size


@pytest.mark.parametrize("size, error, recorded", [
    (1, ValueError("bad value"), True),
    (2, ValueError("bad value"), False),  # may be one rank's alone: re-raised so the guard aborts every rank
    (2, FloatingPointError("client 3 diverged"), True),  # raised on every rank together
    (2, ConfigError("strategy.k_min too large"), True),
])
def test_a_failing_point_is_recorded_only_when_every_rank_raises_it(tmp_path, monkeypatch, size, error, recorded):
    import fedhpc.experiment
    from fedhpc import sweep as sweep_module

    sweep = load_sweep(_write(tmp_path / "s.yaml", _sweep_dict(tmp_path)))
    point = plan(sweep).points[0]

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(fedhpc.experiment, "run", fail)
    cfg = sweep_module._requested(sweep, point)
    if recorded:
        sweep_module._run_locked(sweep, point, cfg, comm=_Ranks(size), guard=None, say=lambda *_: None)
        assert json.loads((point.run_dir / "failed.json").read_text())["error"] == str(error)
    else:
        with pytest.raises(ValueError, match="bad value"):
            sweep_module._run_locked(sweep, point, cfg, comm=_Ranks(size), guard=None, say=lambda *_: None)
        assert not (point.run_dir / "failed.json").exists()


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_committed_sweep_files_resolve(path, tmp_path):
    """Every sweep file in configs/sweeps checks, and each method's first point resolves to a valid
    config (a renamed config key would otherwise surface only when someone reruns the sweep)."""
    from fedhpc.sweep import _requested

    sweep = load_sweep(path)
    sweep.out = tmp_path / sweep.name  # plan reads run directories: none here
    first = {}
    for point in plan(sweep).points:
        first.setdefault(point.method, point)
    assert set(first) == set(sweep.methods)
    for point in first.values():
        assert _requested(sweep, point).seed in sweep.tuning_seeds

"""The Python API (`fedhpc.run`): the same run as the CLI, from a path, a dict or an ExperimentConfig; its
example runs in one process and under mpiexec with the same numbers; progress, metrics.csv, TensorBoard."""
import csv
import io
import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import fedhpc
from fedhpc.config import load_config

from conftest import REPO, TINY

EXAMPLE = REPO / "examples" / "python_api.py"


def _drop_wall(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "wall_seconds"}


def test_run_takes_a_path_a_dict_or_a_config_and_matches_the_cli(tmp_path):
    overrides = TINY + [f"out_dir={tmp_path / 'api'}", "rounds=1"]
    by_path = fedhpc.run(REPO / "configs" / "quickstart.yaml", overrides=overrides, progress=False)
    cfg = load_config(REPO / "configs" / "quickstart.yaml", overrides)
    assert _drop_wall(fedhpc.run(cfg, progress=False)) == _drop_wall(by_path)
    import yaml

    as_dict = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    assert _drop_wall(fedhpc.run(as_dict, overrides=overrides, progress=False)) == _drop_wall(by_path)
    # the CLI in a fresh process: its summary.json holds the same numbers
    proc = subprocess.run([sys.executable, "-m", "fedhpc", "run", "configs/quickstart.yaml", *TINY, "rounds=1",
                           f"out_dir={tmp_path / 'cli'}", "--quiet"], cwd=REPO, capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    cli = json.loads((tmp_path / "cli" / "quickstart" / "summary.json").read_text())
    api = json.loads((tmp_path / "api" / "quickstart" / "summary.json").read_text())
    assert _drop_wall(cli) == _drop_wall(api)


def test_bad_config_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(fedhpc.ConfigError, match="unknown key 'train.epochs'.*train.local_epochs"):
        fedhpc.run({"train": {"epochs": 2}}, progress=False)
    with pytest.raises(fedhpc.ConfigError, match="config must be a YAML path, a dict or an ExperimentConfig"):
        fedhpc.run(3)


def test_example_runs_in_one_process_and_under_mpi_with_the_same_numbers(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--out", str(tmp_path / "one")], cwd=REPO,
                          capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].split() == ["method", "global", "personalized", "MB", "up"]
    launcher = Path(sys.executable).parent / "mpiexec"
    both = subprocess.run([str(launcher), "-n", "2", sys.executable, str(EXAMPLE), "--out", str(tmp_path / "two")],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": f"{launcher.parent}:/usr/bin:/bin"})
    assert both.returncode == 0, both.stderr
    assert both.stdout == proc.stdout, "rank 0 alone prints, and prints the same table"
    for method in ("fedit", "fedsa_lora"):
        one = json.loads((tmp_path / "one" / method / "summary.json").read_text())
        two = json.loads((tmp_path / "two" / method / "summary.json").read_text())
        assert two["ranks"] == 2 and one["ranks"] == 1
        # the loss is a float64 sum whose order follows the ranks: equal to rounding
        assert math.isclose(one.pop("final_train_loss"), two.pop("final_train_loss"), rel_tol=1e-12)
        assert {k: v for k, v in _drop_wall(one).items() if k not in ("ranks", "mpi_bytes")} == \
               {k: v for k, v in _drop_wall(two).items() if k not in ("ranks", "mpi_bytes")}


def test_metrics_csv_holds_the_jsonl_rounds(tmp_path):
    fedhpc.run(REPO / "configs" / "quickstart.yaml", overrides=TINY + [f"out_dir={tmp_path}", "eval.every=2",
                                                                       "rounds=3"], progress=False)
    run_dir = tmp_path / "quickstart"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = list(csv.DictReader(io.StringIO((run_dir / "metrics.csv").read_text())))
    assert len(rows) == len(lines) == 3
    for line, row in zip(lines, rows):
        assert set(line) <= set(row)
        for key, value in row.items():
            if key not in line or line[key] is None:
                assert value == "", (key, value)  # round 1 was not evaluated (eval.every=2)
            elif isinstance(line[key], (int, float)):
                assert math.isclose(float(value), line[key], rel_tol=1e-12), key
    assert "global_accuracy" not in lines[0] and rows[0]["global_accuracy"] == "" and rows[1]["global_accuracy"] != ""


def test_tensorboard_event_files_hold_the_round_metrics(tmp_path):
    pytest.importorskip("tensorboard")  # an optional extra: only this test needs it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedhpc.io.report import write_report

    fedhpc.run(REPO / "configs" / "quickstart.yaml", overrides=TINY + [f"out_dir={tmp_path}"], progress=False)
    write_report([str(tmp_path / "quickstart")], str(tmp_path / "report"))
    folders = list((tmp_path / "report" / "tensorboard").iterdir())
    assert len(folders) == 1
    events = EventAccumulator(str(folders[0]))
    events.Reload()
    lines = [json.loads(line) for line in (tmp_path / "quickstart" / "metrics.jsonl").read_text().splitlines()]
    loss = [(e.step, e.value) for e in events.Scalars("train_loss")]
    assert loss == [(m["round"], pytest.approx(m["train_loss"], rel=1e-6)) for m in lines]


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_live_bar_on_a_terminal_and_lines_elsewhere():
    from fedhpc.io.progress import Progress

    metrics = {"train_loss": 0.5, "global_accuracy": 0.75, "personalized_mean": 0.8, "clients_per_second": 12.0}
    tty, log = _Tty(), io.StringIO()
    for stream in (tty, log):
        bar = Progress(rounds=4, stream=stream)
        bar.say("fedhpc: start")
        for r in range(1, 5):
            bar.round(r, metrics)
        bar.say("fedhpc: done")
    live = tty.getvalue()
    assert live.count("\r\033[K") == 4 and live.count("\n") == 3  # start, the bar's end, done
    assert "round 4/4 [####################] 100%  12.0 clients/s  loss 0.5000  acc 0.7500  left 0:00:00" in live
    plain = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(plain) == 6
    assert plain[1].startswith("round   1/4  loss 0.5000  global 0.7500  personalized 0.8000  12.0 clients/s  left ")
    quiet = io.StringIO()
    Progress(rounds=2, stream=quiet, active=False).round(1, metrics)
    assert quiet.getvalue() == ""


def test_progress_time_left_is_the_mean_round_time_times_rounds_left(monkeypatch):
    from fedhpc.io import progress

    clock = iter([100.0, 130.0])  # constructed at 100 s; after round 3 of 10 (first reported: 2), 130 s
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    bar = progress.Progress(rounds=10, first=2, stream=io.StringIO())
    assert bar.seconds_left(3) == pytest.approx(30.0 / 2 * 7)
    assert progress.format_seconds(3725) == "1:02:05"

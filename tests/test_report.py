"""`fedhpc report`: the table holds each run's figures, the plots are real PNGs of the data."""
import math

import numpy as np
import pytest
from matplotlib.image import imread

from fedhpc.cli import main
from fedhpc.io.report import PLOTS, write_report
from fedhpc.io.run_dir import RunDir


def _fake_run(root, name, *, strategy, rounds, done, accs):
    """A run directory written through RunDir, as the round loop writes it."""
    out = RunDir(root / name, active=True)
    out.write_config({"name": name, "rounds": rounds, "strategy": {"name": strategy}})
    for r in range(1, (rounds if done else rounds - 1) + 1):
        out.log_round({"round": r, "train_loss": 1.0 / r, "participants": 4, "bytes_up": 1000 * r,
                       "bytes_down": 2000 * r, "mpi_bytes": 0, "global_accuracy": 0.1 * r,
                       "personalized_mean": 0.2 * r, "round_seconds": 0.5})
    out.write_client_accuracy(rounds, np.arange(len(accs)), np.asarray(accs))
    if done:
        out.write_summary({"name": name, "strategy": strategy, "global_accuracy": 0.1 * rounds,
                           "personalized_mean": float(np.nanmean(accs)), "personalized_std": 0.05,
                           "personalized_p10": 0.4, "unseen_accuracy": math.nan, "unseen_accuracy_finetuned": 0.3,
                           "bytes_up": 1000 * rounds, "bytes_down": 2000 * rounds, "wall_seconds": 12.34})
    return root / name


def _table(text):
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0]]
    return [dict(zip(header, (c.strip() for c in row))) for row in rows[1:]]


def test_report_table_and_plots(tmp_path):
    a = _fake_run(tmp_path / "x", "same", strategy="fedit", rounds=3, done=True, accs=[0.5, 0.75, math.nan, 1.0])
    b = _fake_run(tmp_path / "y", "same", strategy="fedsa_lora", rounds=4, done=False, accs=[0.25, 0.5])
    out = tmp_path / "report"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    rows = _table((out / "report.md").read_text())
    assert [r["run"] for r in rows] == ["x/same", "y/same"]  # same folder name: the parent tells them apart
    done, running = rows
    assert done["strategy"] == "fedit" and done["status"] == "done"
    assert float(done["global acc"]) == pytest.approx(0.3)
    assert float(done["personalized mean"]) == pytest.approx(0.75)
    assert done["unseen acc"] == "–" and float(done["unseen acc (fine-tuned)"]) == pytest.approx(0.3)
    assert float(done["MB up"]) == pytest.approx(0.003) and float(done["MB down"]) == pytest.approx(0.006)
    assert done["wall s"] == "12.3"
    # an unfinished run reports its last logged round
    assert running["status"] == "incomplete (3/4 rounds)"
    assert float(running["personalized mean"]) == pytest.approx(0.6)
    assert running["wall s"] == "–"
    first, second = (0.122, 0.467, 0.706), (1.0, 0.498, 0.055)  # matplotlib's C0 and C1: the two runs' lines
    for name in (PLOTS[0], PLOTS[2]):  # accuracy per round and against MB: both runs drawn
        image = imread(out / name)
        for colour in (first, second):  # a line across the axes, not a legend swatch
            assert _pixels(image, colour) > 40 and _span(image, colour) > image.shape[1] // 4, name
    clients = imread(out / PLOTS[1])[..., :3]  # boxes with orange medians and each client as a half-gray dot
    orange = lambda im: int(((im[..., 0] > 0.9) & (im[..., 1] > 0.4) & (im[..., 1] < 0.7) & (im[..., 2] < 0.35)).sum())
    assert orange(clients) > 50 and _pixels(clients, (0.75, 0.75, 0.75), tol=0.03) > 20
    # the same checks see nothing in plots of runs that logged nothing
    empty = [RunDir(tmp_path / "z" / n, active=True) for n in ("e1", "e2")]
    for run in empty:
        run.write_config({"name": run.path.name, "rounds": 3, "strategy": {"name": "fedit"}})
        run.write_client_accuracy(0, np.arange(0), np.zeros(0))
    write_report([run.path for run in empty], tmp_path / "empty")
    for name in (PLOTS[0], PLOTS[2]):
        image = imread(tmp_path / "empty" / name)
        assert _pixels(image, first) == 0 and _pixels(image, second) == 0, name
    assert orange(imread(tmp_path / "empty" / PLOTS[1])[..., :3]) == 0


def _match(image, rgb, tol=0.06):
    return (np.abs(image[..., :3] - np.array(rgb)) < tol).all(-1)


def _pixels(image, rgb, tol=0.06) -> int:
    """Pixels of this colour (RGB in [0, 1]) in a PNG read by matplotlib."""
    return int(_match(image, rgb, tol).sum())


def _span(image, rgb) -> int:
    """Width in pixels between the leftmost and rightmost pixel of this colour."""
    cols = np.flatnonzero(_match(image, rgb).any(0))
    return int(cols[-1] - cols[0]) if len(cols) else 0


def test_report_names_a_missing_run(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "not a fedhpc run directory" in capsys.readouterr().err


def test_report_of_a_real_run(tiny_overrides, tmp_path):
    from mpi4py import MPI

    from conftest import REPO
    from fedhpc.config import load_config
    from fedhpc.experiment import run

    cfg = load_config(REPO / "configs/quickstart.yaml", tiny_overrides + ["name=real", "checkpoint.every=0"])
    summary = run(cfg, comm=MPI.COMM_SELF, progress=False)
    written = write_report([tmp_path / "real"], tmp_path / "rep")
    (row,) = _table(written[3].read_text())
    assert float(row["personalized mean"]) == pytest.approx(summary["personalized_mean"], abs=5e-5)
    assert float(row["global acc"]) == pytest.approx(summary["global_accuracy"], abs=5e-5)

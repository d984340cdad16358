"""`fedhpc report`: compare finished (or still running) runs as PNG plots and a Markdown table.

    fedhpc report runs/fedit runs/fedsa_lora --out reports/compare

reads each run directory (`config.yaml`, `metrics.jsonl`, `summary.json`, `client_accuracy.json`)
and writes into `--out`:
- `accuracy_per_round.png`: global and mean personalized accuracy at every evaluated round;
- `client_accuracy.png`: the distribution of per-client personalized accuracy (latest evaluation);
- `accuracy_vs_bytes.png`: the same accuracies against cumulative bytes communicated (up + down);
- `report.md`: one table row per run, with links to the plots;
- `tensorboard/<run>/`: event files, only when the `tensorboard` package is installed.
A run without `summary.json` (interrupted, or still going) is reported from its last round
and marked as such. Plots use matplotlib's object API (no pyplot state, no display needed).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

__all__ = ["RunRecord", "load_run", "write_report", "PLOTS"]

PLOTS = ("accuracy_per_round.png", "client_accuracy.png", "accuracy_vs_bytes.png")
MB = 1e6


@dataclass
class RunRecord:
    """What a report needs from one run directory."""
    path: Path
    label: str
    config: dict
    metrics: list[dict]
    summary: dict | None
    """None while the run has not finished."""
    client_accuracy: dict | None

    def value(self, key: str):
        """A final figure: from the summary, else from the last round that has it."""
        if self.summary is not None:
            return self.summary.get(key)
        for line in reversed(self.metrics):
            if line.get(key) is not None:
                return line[key]
        return None

    @property
    def status(self) -> str:
        rounds = self.config.get("rounds", "?")
        if self.summary is not None:
            return "done"
        done = self.metrics[-1]["round"] if self.metrics else 0
        return f"incomplete ({done}/{rounds} rounds)"


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def load_run(path: str | Path, label: str | None = None) -> RunRecord:
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"'{path}' is not a fedhpc run directory (no config.yaml)")
    metrics = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (path / "metrics.jsonl").is_file() else []
    return RunRecord(path, label or path.name, yaml.safe_load((path / "config.yaml").read_text()), metrics,
                     _read_json(path / "summary.json"), _read_json(path / "client_accuracy.json"))


def _labels(paths: list[Path]) -> list[str]:
    """Run folder names, or `parent/name` where two runs share a name."""
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def write_report(paths: list[str | Path], out: str | Path) -> list[Path]:
    """Write the plots and `report.md` for these run directories; returns the files written."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("report: name at least one run directory")
    runs = [load_run(p, label) for p, label in zip(paths, _labels(paths))]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [_plot_accuracy(runs, out / PLOTS[0], against_bytes=False), _plot_clients(runs, out / PLOTS[1]),
               _plot_accuracy(runs, out / PLOTS[2], against_bytes=True), _markdown(runs, out / "report.md")]
    written += _tensorboard(runs, out / "tensorboard")
    return written


def _evaluated(run: RunRecord, key: str) -> tuple[list[float], list[float], list[float]]:
    """(round, bytes up+down in MB, value) of every round where `key` was measured."""
    rows = [m for m in run.metrics if m.get(key) is not None]
    return ([m["round"] for m in rows], [(m["bytes_up"] + m["bytes_down"]) / MB for m in rows],
            [m[key] for m in rows])


def _figure(width: float = 10.0, height: float = 4.0, cols: int = 2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, cols, squeeze=False)[0]


def _plot_accuracy(runs: list[RunRecord], path: Path, *, against_bytes: bool) -> Path:
    """Global and personalized accuracy of every run, per round or per MB communicated."""
    fig, axes = _figure()
    xlabel = "MB communicated (up + down, cumulative)" if against_bytes else "round"
    for ax, key, title in zip(axes, ("global_accuracy", "personalized_mean"),
                              ("global model", "personalized (mean over clients)")):
        for run in runs:
            rounds, sent, values = _evaluated(run, key)
            if values:
                ax.plot(sent if against_bytes else rounds, values, marker="o", markersize=3, label=run.label)
        ax.set(title=title, xlabel=xlabel, ylabel="accuracy")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return path


def _plot_clients(runs: list[RunRecord], path: Path) -> Path:
    fig, (ax,) = _figure(width=max(5.0, 1.2 * len(runs) + 2), cols=1)
    data, labels = [], []
    for run in runs:
        accs = [a for a in (run.client_accuracy or {}).get("personalized_accuracy", []) if a is not None]
        if accs:
            data.append(accs)
            labels.append(run.label)
    if data:
        ax.boxplot(data, tick_labels=labels, showmeans=True)
        for i, accs in enumerate(data, start=1):  # every client as a dot, spread evenly (no RNG)
            offsets = [(j / max(len(accs) - 1, 1) - 0.5) * 0.3 for j in range(len(accs))]
            ax.scatter([i + o for o in offsets], accs, s=8, alpha=0.5, color="tab:gray", zorder=3)
    ax.set(title="per-client personalized accuracy (latest evaluation)", ylabel="accuracy")
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=120)
    return path


COLUMNS = [("run", None), ("strategy", None), ("status", None), ("global acc", "global_accuracy"),
           ("personalized mean", "personalized_mean"), ("personalized std", "personalized_std"),
           ("personalized p10", "personalized_p10"), ("unseen acc", "unseen_accuracy"),
           ("unseen acc (fine-tuned)", "unseen_accuracy_finetuned"), ("MB up", "bytes_up"),
           ("MB down", "bytes_down"), ("wall s", "wall_seconds")]


def _cell(key: str, value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if key.startswith("bytes"):
        return f"{value / MB:.4g}"
    if key == "wall_seconds":
        return f"{value:.1f}"
    return f"{value:.4f}"


def _markdown(runs: list[RunRecord], path: Path) -> Path:
    lines = ["# fedhpc report", "", "| " + " | ".join(name for name, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for run in runs:
        cells = [run.label, str(run.config.get("strategy", {}).get("name", "?")), run.status]
        cells += [_cell(key, run.value(key)) for _, key in COLUMNS[3:]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Accuracies are fractions in [0, 1]; MB = 10^6 bytes of adapter traffic (float32).", "",
              "Runs:", *[f"- `{run.label}`: `{run.path}`" for run in runs], ""]
    lines += [f"![{name}]({name})" for name in PLOTS]
    path.write_text("\n".join(lines) + "\n")
    return path


def _tensorboard(runs: list[RunRecord], root: Path) -> list[Path]:
    """Scalars per round as TensorBoard event files, when tensorboard is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return []
    written = []
    for run in runs:
        folder = root / run.label.replace("/", "_")
        with SummaryWriter(log_dir=str(folder)) as writer:
            for m in run.metrics:
                for key, value in m.items():
                    if key != "round" and isinstance(value, (int, float)) and value is not None:
                        writer.add_scalar(key, value, m["round"])
        written.append(folder)
    return written

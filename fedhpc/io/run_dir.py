"""The run directory: resolved config, one metrics line per round, a final summary, and each
client's latest personalized accuracy (`client_accuracy.json`, for distribution plots).
`metrics.csv` holds the rounds of `metrics.jsonl` as a table (one column per metric, in order of
first appearance; empty where a round did not compute it, e.g. between evaluations), for
spreadsheets and pandas; it is rewritten whole after each round.

Only the root rank writes. Each file is replaced atomically (written aside, then renamed), so a
run killed mid-write never leaves a torn `summary.json` or `config.yaml`; `metrics.jsonl` is
appended line by line and flushed every round.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import yaml

__all__ = ["RunDir", "json_line", "csv_table"]


def _clean(value):
    """JSON has no NaN: undefined metrics (no global model, no unseen clients) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def json_line(record: dict) -> str:
    """One metrics.jsonl line (NaN as null)."""
    return json.dumps(_clean(record)) + "\n"


def csv_table(history: list[dict]) -> str:
    """The rounds as CSV: a header of every metric seen (first-appearance order), then one row per round."""
    columns = list(dict.fromkeys(k for m in history for k in m))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for m in history:
        row = [_clean(m.get(k)) for k in columns]
        writer.writerow(["" if v is None else json.dumps(v) if isinstance(v, (dict, list)) else v for v in row])
    return buf.getvalue()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    def __init__(self, root: str | Path, *, active: bool, history: list[dict] = ()):
        """`history`: the rounds a resumed run already has; later lines of an interrupted run go."""
        self.path = Path(root)
        self.active = active
        self.rows = list(history)
        if active:
            self.path.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.path / "metrics.jsonl", "".join(json_line(m) for m in history))
            _write_atomic(self.path / "metrics.csv", csv_table(self.rows))
            (self.path / "summary.json").unlink(missing_ok=True)  # written again when this run ends

    def write_config(self, config: dict) -> None:
        if self.active:
            _write_atomic(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def log_round(self, metrics: dict) -> None:
        if self.active:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json_line(metrics))
            self.rows.append(metrics)
            _write_atomic(self.path / "metrics.csv", csv_table(self.rows))

    def write_client_accuracy(self, round_index: int, clients, accuracy) -> None:
        """Per-client personalized accuracy of the latest evaluated round (replaced each time)."""
        if self.active:
            record = {"round": round_index, "clients": [int(c) for c in clients],
                      "personalized_accuracy": [float(a) for a in accuracy]}
            _write_atomic(self.path / "client_accuracy.json", json.dumps(_clean(record)) + "\n")

    def write_summary(self, summary: dict) -> None:
        if self.active:
            _write_atomic(self.path / "summary.json", json.dumps(_clean(summary), indent=2) + "\n")

"""Progress of a run on rank 0: a live bar on a terminal, plain lines otherwise (logs, Slurm).

On a terminal one line is redrawn after every round:

    round  7/20 [########..........]  35%  4.1 clients/s  loss 0.8123  acc 0.6410  left 0:00:52

(`acc` is the global accuracy, or the mean personalized accuracy of a method without a global model;
`left` is the mean round time so far times the rounds still to run). Elsewhere, as under Slurm or
with output sent to a file, each round prints one plain line with the same figures, so a log stays
readable. Other ranks print nothing.
"""
from __future__ import annotations

import math
import sys
import time

__all__ = ["Progress", "format_seconds"]

BAR_WIDTH = 20


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _number(value, fmt: str) -> str:
    return "   n/a" if value is None or not math.isfinite(value) else format(value, fmt)


class Progress:
    def __init__(self, *, rounds: int, first: int | None = None, active: bool = True, stream=None,
                 live: bool | None = None):
        """`first`: the round this process starts at (default: the first one it reports; a resumed
        run counts its time from there); `live`: redraw one line (default: when `stream` is a terminal)."""
        self.stream = sys.stdout if stream is None else stream
        self.active = active
        self.live = (self.stream.isatty() if live is None else live) if active else False
        self.rounds, self.first = rounds, first
        self.started = time.perf_counter()
        self._open = False  # a live line is on screen

    def say(self, text: str) -> None:
        """A line of its own (above the bar)."""
        if not self.active:
            return
        if self._open:
            self.stream.write("\n")
            self._open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def seconds_left(self, round_index: int) -> float:
        if self.first is None:
            self.first = round_index
        done = round_index - self.first + 1
        return (time.perf_counter() - self.started) / done * (self.rounds - round_index) if done > 0 else math.nan

    def line(self, round_index: int, metrics: dict) -> str:
        acc = metrics.get("global_accuracy")
        if acc is None or not math.isfinite(acc):
            acc = metrics.get("personalized_mean")
        width = len(str(self.rounds))
        figures = (f"{_number(metrics.get('clients_per_second'), '.1f')} clients/s  "
                   f"loss {_number(metrics.get('train_loss'), '.4f')}  acc {_number(acc, '.4f')}  "
                   f"left {format_seconds(self.seconds_left(round_index))}")
        if self.live:
            filled = round(BAR_WIDTH * round_index / self.rounds)
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            return (f"round {round_index:>{width}}/{self.rounds} [{bar}] {100 * round_index / self.rounds:3.0f}%  "
                    + figures)
        return (f"round {round_index:>3}/{self.rounds}  loss {_number(metrics.get('train_loss'), '.4f')}  "
                f"global {_number(metrics.get('global_accuracy'), '.4f')}  "
                f"personalized {_number(metrics.get('personalized_mean'), '.4f')}  "
                f"{_number(metrics.get('clients_per_second'), '.1f')} clients/s  "
                f"left {format_seconds(self.seconds_left(round_index))}")

    def round(self, round_index: int, metrics: dict) -> None:
        if not self.active:
            return
        if self.live:
            self.stream.write("\r\033[K" + self.line(round_index, metrics))
            self._open = True
            if round_index == self.rounds:
                self.stream.write("\n")
                self._open = False
        else:
            self.stream.write(self.line(round_index, metrics) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.active and self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False

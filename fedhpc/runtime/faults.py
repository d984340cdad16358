"""Client faults: who does not return, who is late, and who diverged, in a round.

A federated simulator is used to study clients that fail, so the round loop can make some of a
round's participants fail on purpose (`faults` in the config; all off by default, and then the
loop runs exactly as without this module):

- dropout: a participant does not return. Its work of the round is lost: it downloaded the
  round's model (counted in bytes down), uploads nothing (no bytes up, in no block), and its
  stored client state stays what it was before the round (as if the device crashed mid-round;
  keeping its new private state would let it advance on work the server never saw and would
  break the methods whose client state mirrors the server's, e.g. control variates or a
  statistic the server clusters). The simulator therefore does not train it at all.
- stragglers: a returning participant is late: by the round's deadline it has done only a
  fraction of its local steps (drawn per client in [work_min, work_max]). The server's policy:
  `wait` for the full work (numbers as without stragglers; only the count is logged), `drop`
  the late clients (handled exactly like dropout), or accept their `partial` work: they train
  their first `max(1, floor(f x steps))` steps and their rows count in every block with their
  weight times steps done / steps asked (to 1/256, which keeps the float64 sums rank-independent).
- diverged: a client whose loss or upload (or new state) holds NaN / inf is named with its id and
  the round; `stop` ends the run with a one-line error (exit 2), `exclude` leaves it out of the
  aggregate and keeps its previous state (like a dropped client).

Every draw is keyed by (seed, client, round) (`Purpose.FAULTS`), so the same clients fail on any
rank count and after a resume. How a method's aggregate copes with a missing client is the
exchange's: a mean block renormalises over the clients that returned, a group nobody returned to
keeps its state (`replace_present`), a gathered block holds only returned rows, and a round in
which nobody returned leaves the server state untouched (`aggregate_train` is not called).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from ..rng import Purpose, keyed_rng

__all__ = ["FaultsConfig", "RoundFaults", "draw_faults", "steps_done", "nonfinite_clients", "keep_rows", "agree_diverged",
           "check_server"]


@dataclass(kw_only=True)
class FaultsConfig:
    dropout: float = 0.0
    """Probability that a participant of a round does not return (its round's work is lost; see
    `fedhpc/runtime/faults.py`). Drawn per (seed, client, round)."""
    stragglers: float = 0.0
    """Probability that a returning participant is late: it finishes only a fraction of its local
    steps before the round's deadline (drawn per client from [work_min, work_max])."""
    work_min: float = 0.1
    """Smallest fraction of its local steps a late client has done at the deadline."""
    work_max: float = 0.9
    """Largest fraction of its local steps a late client has done at the deadline."""
    policy: Literal["wait", "drop", "partial"] = "wait"
    """What the server does with late clients: wait for their full work, drop them (as dropout),
    or accept their partial work, weighted by the fraction of steps done."""
    diverged: Literal["stop", "exclude"] = "stop"
    """A client whose loss or update is NaN / inf: stop the run with a one-line error naming it,
    or exclude it from the aggregate (its state stays as before the round) and go on."""

    def __post_init__(self):
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.stragglers <= 1.0:
            raise ValueError(f"stragglers must be in [0, 1], got {self.stragglers}")
        if not 0.0 < self.work_min <= self.work_max <= 1.0:
            raise ValueError(f"need 0 < work_min <= work_max <= 1, got {self.work_min}, {self.work_max}")

    @property
    def active(self) -> bool:
        """Whether any fault is drawn (the round log then counts returned / dropped / late)."""
        return self.dropout > 0 or self.stragglers > 0

    @property
    def logged(self) -> bool:
        """Whether the round log counts returned / dropped / late / diverged clients (any fault on)."""
        return self.active or self.diverged != "stop"


@dataclass
class RoundFaults:
    """A round's faults among its participants, the same on every rank."""
    returned: np.ndarray
    """Sorted ids of the participants that train and upload (late ones included unless dropped)."""
    dropped: np.ndarray
    """Participants that did not return (dropout, and late clients under `drop`)."""
    late: np.ndarray
    """Participants that were late (under every policy)."""
    work: dict[int, float] = field(default_factory=dict)
    """Fraction of its local steps each late client trains (`partial` only; others train all)."""

    def work_of(self, clients: np.ndarray) -> np.ndarray | None:
        """`[C]` fraction of their steps these clients train, or None when all train every step."""
        if not any(int(c) in self.work for c in clients):
            return None
        return np.array([self.work.get(int(c), 1.0) for c in clients], dtype=np.float64)


def draw_faults(cfg: FaultsConfig, participants: np.ndarray, *, seed: int, round_index: int) -> RoundFaults:
    """Which participants drop out or are late this round (keyed by seed, client and round)."""
    participants = np.asarray(participants, dtype=np.int64)
    empty = np.zeros(0, dtype=np.int64)
    if not cfg.active:
        return RoundFaults(participants, empty, empty)
    dropped, late, work = [], [], {}
    for client in participants:
        u = keyed_rng(seed, int(client), round_index, purpose=Purpose.FAULTS).random(3)
        if u[0] < cfg.dropout:
            dropped.append(client)
        elif u[1] < cfg.stragglers:
            late.append(client)
            if cfg.policy == "drop":
                dropped.append(client)
            elif cfg.policy == "partial":
                work[int(client)] = cfg.work_min + (cfg.work_max - cfg.work_min) * float(u[2])
    dropped = np.sort(np.array(dropped, dtype=np.int64))
    returned = participants[~np.isin(participants, dropped)]
    return RoundFaults(returned, dropped, np.array(late, dtype=np.int64), work)


def steps_done(total: int, work: float) -> int:
    """Local steps a late client with `work` of its `total` steps has done: at least one."""
    return min(total, max(1, math.floor(work * total)))


def _per_client(value: torch.Tensor, clients: int) -> bool:
    """Whether a pass's entry has one row per client (`[C, ...]`); else the pass shares it (leading 1,
    e.g. ILoRA's dense residual), and no single client is to blame for it or loses it."""
    return value.dim() > 0 and len(value) == clients


def nonfinite_clients(losses: torch.Tensor, *parts: dict[str, torch.Tensor]) -> np.ndarray:
    """`[C]` bool: clients whose loss or any row of `parts` (new state, upload: `[C, ...]`) holds NaN / inf."""
    bad = ~torch.isfinite(losses.detach()).cpu()
    for part in parts:
        for value in part.values():
            if value.is_floating_point() and _per_client(value, len(bad)):
                bad |= ~torch.isfinite(value.detach()).reshape(len(value), -1).all(1).cpu()
    return bad.numpy()


def keep_rows(part: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """`part` (a pass's new state, upload or optimizer rows) with only the clients `keep` marks: per-client
    entries lose the other rows, an entry the pass shares stays whole."""
    return {k: v[keep.to(v.device)] if _per_client(v, len(keep)) else v for k, v in part.items()}


def agree_diverged(local: list[int], count: int, *, cfg: FaultsConfig, round_index: int, comm) -> np.ndarray:
    """Collective when `count` (every rank's diverged clients, summed) > 0: the sorted ids of every
    diverged client on every rank. Under `stop`, raises one line naming them (on every rank)."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    ids = np.sort(np.concatenate([np.asarray(part, dtype=np.int64) for part in comm.allgather(list(local))]))
    named = ", ".join(map(str, ids[:10])) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
    if cfg.diverged == "stop":
        raise FloatingPointError(f"round {round_index}: client{'s' * (len(ids) > 1)} {named} diverged (loss or "
                                 f"update NaN / inf); lower train.optimizer.lr, set train.max_grad_norm, or "
                                 f"set faults.diverged=exclude to leave diverged clients out of the aggregate")
    return ids


def check_server(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], *, round_index: int,
                 strategy: str) -> None:
    """Never a silent NaN in the server state: a floating tensor that was finite before
    `aggregate_train` and is not after it ends the run with one line naming it. (Uploads are
    screened before they reach the aggregate, `nonfinite_clients`; a tensor a method creates or
    keeps at NaN on purpose, e.g. a score not defined for a cut, is left alone.)"""
    for key, value in after.items():
        old = before.get(key)
        if old is None or not value.is_floating_point() or bool(torch.isfinite(value).all()):
            continue
        if old.is_floating_point() and bool(torch.isfinite(old).all()):
            raise FloatingPointError(f"round {round_index}: strategy {strategy}'s aggregate put NaN / inf into server "
                                     f"tensor {key!r}; the run stops rather than carry it on")

"""Resuming: which checkpoint a run continues from, and with which config.

A run resumes from its newest checkpoint that passes every checksum; a torn or corrupt one is
reported in one line and the one before it is tried. A resumed run keeps its config, except for
MAY_CHANGE_ON_RESUME; any other difference is a one-line error naming the key.

No RNG state is stored because there is none to store: every random draw in a run comes from
a generator keyed by (seed, client, round, purpose) (sampling, data order, dropout masks,
initialisation, data), never from a global stream (tests/test_checkpoint.py checks that a run
leaves the global torch / numpy / random states untouched).
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .format import WHOLE_FILE, CheckpointError, checkpoint_dir, verify

__all__ = ["find_resumable", "MAY_CHANGE_ON_RESUME", "resume_config"]


def _check(path: Path) -> None:
    rows = verify(path)
    bad = [name for name, *_, ok in rows if not ok and name != WHOLE_FILE]
    if bad:
        raise CheckpointError(f"{path}: checksum mismatch in {', '.join(bad[:3])}")
    if not all(ok for *_, ok in rows):  # every dataset is intact: the flip is in HDF5's own metadata
        raise CheckpointError(f"{path}: checksum mismatch in the file's metadata (whole-file CRC-32)")


def find_resumable(run_dir: str | Path, *, comm, say=print) -> Path | None:
    """The newest checkpoint of a run that passes every checksum (rank 0 checks, all ranks
    get the answer); a bad one is reported in one line and the previous one is tried."""
    choice = None
    if comm.Get_rank() == 0:
        files = sorted(checkpoint_dir(run_dir).glob("round-*.h5"), reverse=True)
        for path in files:
            try:
                _check(path)
                choice = str(path)
                break
            except CheckpointError as err:
                say(f"fedhpc: checkpoint {err}; falling back to the previous one")
    choice = comm.bcast(choice, root=0)
    return Path(choice) if choice else None


MAY_CHANGE_ON_RESUME = ("rounds", "device", "out_dir", "name", "train.clients_per_pass", "checkpoint.",
                        "store.memory_cap_mb")
"""Config keys a resumed run may change: none of them alters the numbers of the rounds already run."""


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _defaults(requested: dict) -> dict:
    """Every config key's default for the requested strategy (flattened); {} if unavailable."""
    try:
        from ...config import to_dict
        from ...configtree import build
        from ...config import ExperimentConfig

        name = requested.get("strategy", {}).get("name")
        return _flatten(yaml.safe_load(yaml.safe_dump(to_dict(build(ExperimentConfig, {"strategy": {"name": name}})))))
    except Exception:  # noqa: BLE001  (best effort: without defaults every difference is reported)
        return {}


def resume_config(stored: dict, requested: dict, *, saved_round: int) -> dict:
    """The config of a resumed run: `requested`, which must equal the checkpoint's `stored` one
    except for MAY_CHANGE_ON_RESUME (`train.clients_per_pass: 0` keeps the probed value)."""
    old = _flatten(yaml.safe_load(yaml.safe_dump(stored)))
    new = _flatten(yaml.safe_load(yaml.safe_dump(requested)))
    defaults = _defaults(requested)
    for key in sorted(old.keys() | new.keys()):
        if key.startswith(MAY_CHANGE_ON_RESUME) or old.get(key) == new.get(key):
            continue
        if key not in old and key in defaults and new.get(key) == defaults[key]:
            continue  # a key added to fedhpc after the checkpoint was written, at its default
        raise CheckpointError(f"{key}: {new.get(key)!r} differs from the checkpoint's {old.get(key)!r}; a resumed "
                              f"run keeps its config (only rounds, device, train.clients_per_pass, "
                              f"store.memory_cap_mb and checkpoint.* may change): use a new run name to change it")
    if requested["rounds"] < saved_round:
        raise CheckpointError(f"rounds: {requested['rounds']} but the checkpoint is at round {saved_round}")
    out = yaml.safe_load(yaml.safe_dump(requested))
    if not out["train"]["clients_per_pass"]:
        out["train"]["clients_per_pass"] = stored["train"]["clients_per_pass"]
    return out

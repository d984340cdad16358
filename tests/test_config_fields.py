"""Every config field, generated from the config dataclasses (every strategy's options included),
given a value of the wrong type and a value out of range: `fedhpc run` answers one line naming the
dotted key, exit 2, no traceback. Also: `device=cuda` without a GPU, and an override that is not YAML.

Out of range, per type: NaN and +-inf for every float; -1 for every number, except the fields in
NEGATIVE_OK, where a negative value means something (each says what); a name outside a Literal's
choices. A field added later is covered without touching this file.
"""
import dataclasses
import math
import typing
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import torch

from conftest import REPO, TINY
from fedhpc.cli import main
from fedhpc.config import ConfigError, ExperimentConfig, load_config
from fedhpc.configtree import Selectable
from fedhpc.strategies import list_strategies
from fedhpc.strategies.base import STRATEGIES

CONFIG = str(REPO / "configs/quickstart.yaml")

NEGATIVE_OK = {
    "strategy.mix_init": "FedTreeLoRA's initial mixing logit θ₀: any real (λ = sigmoid(θ₀))",
    "strategy.tau": "FedTreeLoRA's silhouette threshold: silhouettes lie in [-1, 1], so may a threshold",
}


def _leaves(cls, prefix=""):
    """(dotted key, type) of every leaf field of a config dataclass; a strategy's under each name."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, key = hints[f.name], prefix + f.name
        if isinstance(tp, type) and issubclass(tp, Selectable):
            continue  # the strategy: walked per registered name below
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, key + ".")
        else:
            yield key, tp


def _fields():
    """(overrides that select the section, dotted key, type) for every config field."""
    out = [((), key, tp) for key, tp in _leaves(ExperimentConfig)]
    for name in list_strategies():
        if name.startswith("test_"):
            continue
        out += [((f"strategy.name={name}",), f"strategy.{key}", tp)
                for key, tp in _leaves(STRATEGIES[name].Config) if key != "name"]
    return out


def _base(tp):
    """The type a value is checked against (Optional[X] -> X)."""
    if get_origin(tp) in (Union, getattr(__import__("types"), "UnionType", Union)):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _wrong_type(tp) -> str | None:
    tp = _base(tp)
    origin = get_origin(tp)
    if tp is Any:
        return None
    if origin is Literal:
        return "12345" if all(isinstance(c, str) for c in get_args(tp)) else "no_such_choice"
    if tp is bool:
        return "maybe"
    if tp in (int, float):
        return "abc"
    if tp is str:
        return "[1, 2]"
    if origin in (list, tuple):
        return "abc"
    if origin is dict:
        return "[1, 2]"
    return "{a: 1}"


def _out_of_range(key, tp) -> list[str]:
    tp = _base(tp)
    origin = get_origin(tp)
    values = []
    if tp is float:
        values += [".nan", ".inf", "-.inf"]
    if tp in (int, float) and key not in NEGATIVE_OK:
        values.append("-1")
    if origin is Literal and all(isinstance(c, str) for c in get_args(tp)):
        values.append("no_such_choice")
    if origin is list and get_args(tp) and get_args(tp)[0] in (int, float):
        values.append("[-1]")
    return values


CASES = [(select, key, value, kind) for select, key, tp in _fields()
         for kind, values in (("type", [_wrong_type(tp)]), ("range", _out_of_range(key, tp)))
         for value in values if value is not None]


def test_the_generator_covers_every_section():
    keys = {key for _, key, _, _ in CASES}
    for section in ("data.planted.", "data.partition.", "model.", "lora.", "train.optimizer.", "sampling.", "eval.",
                    "checkpoint.", "faults.", "strategy."):
        assert any(k.startswith(section) for k in keys), section
    assert len(CASES) > 200


@pytest.mark.parametrize("select, key, value, kind", CASES, ids=[f"{k}={v}" for _, k, v, _ in CASES])
def test_a_bad_value_is_one_line_naming_the_key(select, key, value, kind, capsys, tmp_path):
    args = ["run", CONFIG, *TINY, *select, f"{key}={value}"] + ([f"out_dir={tmp_path}"] if key != "out_dir" else [])
    with pytest.raises(ConfigError):  # rejected while the config is read, before anything runs
        load_config(CONFIG, args[2:])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedhpc: error: "), err
    assert key in err, err
    assert not (tmp_path / "quickstart").exists()


def test_negative_values_allowed_on_purpose_are_still_fields():
    keys = {key for _, key, _ in _fields()}
    assert set(NEGATIVE_OK) <= keys


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line(capsys, tmp_path):
    assert main(["run", CONFIG, *TINY, "device=cuda", f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "device: cuda" in err and "no GPU" in err, err


def test_an_override_that_is_not_yaml_is_one_line(capsys, tmp_path):
    assert main(["run", CONFIG, "model.kwargs={img_size:", f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.kwargs" in err, err

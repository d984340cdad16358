"""Typed config trees: dataclasses built from nested dicts, with errors that name the key.

Every config section in fedhpc is a keyword-only dataclass with a docstring under each
field. `build(cls, data)` turns a nested dict (YAML) into that dataclass, checking every
key and type; `apply_overrides` merges `a.b.c=value` strings into the dict first. A typo
raises `ConfigError` naming the dotted key and the closest valid one.

Polymorphic sections (the strategy, whose options depend on its `name`) subclass
`Selectable`: the loader reads `name` first and asks the class for the concrete config.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import yaml

__all__ = ["ConfigError", "Selectable", "build", "apply_overrides", "to_dict", "closest"]


class ConfigError(ValueError):
    """A config value or key that cannot be used; the message names the dotted key."""


class Selectable:
    """Base of a config section whose concrete dataclass is chosen by its `name` field."""

    @classmethod
    def choices(cls) -> dict[str, type]:
        raise NotImplementedError


def closest(word: str, options) -> str:
    options = [str(o) for o in options]
    match = difflib.get_close_matches(str(word), options, n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, key: str):
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{key}: {value!r} is not a {' or '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: unknown value {value!r} (choose from {', '.join(map(str, choices))})"
                              f"{closest(value, choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = get_args(tp)[:1] or (Any,)
        out = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, vt = get_args(tp) or (str, Any)
        for k, v in value.items():
            if v is None and isinstance(k, str) and ":" in k:  # YAML reads {a:1} as the key 'a:1'
                raise ConfigError(f"{key}: key {k!r} has no value; put a space after the colon "
                                  f"({k.split(':', 1)[0]}: {k.split(':', 1)[1]})")
        return {str(k): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # no option means anything by NaN or infinity
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp}")


def build(cls: type, data: dict | None, *, prefix: str = ""):
    """Build dataclass `cls` from a nested dict, validating every key and value."""
    data = dict(data or {})
    if isinstance(cls, type) and issubclass(cls, Selectable):
        choices = cls.choices()
        name = data.get("name", getattr(cls, "default_name", None))
        if name not in choices:
            raise ConfigError(f"{prefix}name: unknown {prefix.rstrip('.') or 'choice'} {name!r} "
                              f"(known: {', '.join(sorted(choices))}){closest(name, choices)}")
        data["name"] = name
        cls = choices[name]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown key '{prefix}{key}'{closest(key, fields)}".replace(
                "did you mean '", f"did you mean '{prefix}"))
        kwargs[key] = _convert(value, hints[key], f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        key = _culprit(cls, kwargs)
        if key is None:
            raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from None
        value = kwargs[key]
        shown = "" if dataclasses.is_dataclass(value) else f" = {value!r}"
        raise ConfigError(f"{prefix}{key}{shown}: {err}") from None


def _culprit(cls: type, kwargs: dict) -> str | None:
    """The key whose value `cls`'s checks refuse: the first given key that, left at its default,
    lets the section build (None when no single key does, e.g. two values that must agree)."""
    for key in kwargs:
        try:
            cls(**{k: v for k, v in kwargs.items() if k != key})
        except (ValueError, TypeError):
            continue
        return key
    return None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Merge `a.b.c=value` strings into a nested dict; values are parsed as YAML scalars."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        path, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"{path.strip()}: {raw!r} is not a YAML value ({str(err).splitlines()[0]}); "
                              f"quote the whole override, e.g. '{path.strip()}={{a: 1, b: 2}}'") from None
        node = data
        *parents, leaf = path.strip().split(".")
        for part in parents:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[leaf] = value
    return data


def to_dict(cfg) -> dict:
    """The resolved config as plain data (for `config.yaml` and checkpoints)."""
    return dataclasses.asdict(cfg)

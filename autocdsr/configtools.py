"""Typed configuration: YAML files and ``key=value`` overrides into (nested) frozen dataclasses.

One mechanism for every entry point: a config key maps to one dataclass field, values are checked
against the field's type annotation when loaded, and an unknown key or a wrong type stops the program
with the key's dotted name. Dataclasses validate their own value ranges in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")

# YAML 1.1 (PyYAML) reads `1e-3` and `1e6` as strings (it wants `1.0e-3`); a float field takes them as numbers
_EXPONENT_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


def parse_scalar(text: str) -> Any:
    """YAML semantics for override values: ``3`` is an int, ``true`` a bool, ``[a, b]`` a list, ``null`` None."""
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys (``train.max_steps=10``) in a nested dict, in place; returns it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = parse_scalar(value)
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    loaded = yaml.safe_load(p.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p}: expected a mapping at top level, got {type(loaded).__name__}")
    return loaded


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    raw = read_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(raw, list(overrides or [])))


def from_dict(cls: type[T], raw: Mapping[str, Any], where: str = "") -> T:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: expected a section, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
            f"known under {where.rstrip('.') or 'top level'}: {', '.join(sorted(fields))}"
        )
    values = {k: _coerce(hints[k], v, where + k) for k, v in raw.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where.rstrip('.') or 'config'}: {e}") from e


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key + ".")  # type: ignore[arg-type]
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(option, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} fits none of {_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(
                f"{key} must be one of {', '.join(map(str, typing.get_args(tp)))}; got {value!r}"
            )
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_coerce(kt, k, f"{key}.{k}"): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_t = args[0] if args else Any
        items = [_coerce(item_t, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or value is None or isinstance(value, dict | list):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {_name(tp)}")


def _name(tp: Any) -> str:
    """A type as a reader of the config knows it: `int or 'warmup'`, not `Union`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_name(t) for t in typing.get_args(tp))
    if origin is Literal:
        return " or ".join(repr(v) for v in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params and docs)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out

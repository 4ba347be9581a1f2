"""Typed experiment configs: YAML files and ``key=value`` overrides into dataclasses, validated.

Every mistake (unknown key, wrong type, unreadable file) becomes one :class:`UserError` line.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tlb_rl.errors import UserError

C = TypeVar("C")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader (never executes code)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except OSError as e:  # a directory, no permission...
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of keys to values, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (values parsed as YAML; ``a.b=1`` sets a nested key)."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override '{item}' must look like key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        *parents, leaf = key.split(".")
        target = data
        for p in parents:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise UserError(f"override '{item}': '{p}' is not a mapping")
        target[leaf] = value
    return data


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, hint)


def _numeric(value: Any, hint: Any) -> Any:
    """YAML 1.1 reads ``3e-4`` and ``1e6`` as strings; take them as the number a numeric field wants."""
    if not isinstance(value, str):
        return value
    allowed = set(typing.get_args(hint)) or {hint}
    try:
        number = float(value)
    except ValueError:
        return value
    if float in allowed:
        return number
    if int in allowed and number.is_integer():
        return int(number)
    return value


def from_dict(cls: type[C], data: dict[str, Any], where: str = "config") -> C:
    """Build dataclass ``cls`` from ``data``, checking every key and value type."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    data = {k: _numeric(v, hints[k]) if k in hints else v for k, v in data.items()}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"unknown {where} key '{key}'{hint}")
        if not _matches(value, hints[key]):
            expected = getattr(hints[key], "__name__", str(hints[key]))
            raise UserError(f"{where} key '{key}' must be {expected}, got {value!r}")
    values = {k: float(v) if hints[k] is float else v for k, v in data.items()}
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)

"""Typed configuration: a dataclass is the source of truth, a YAML file fills it, dotted overrides
(``optim.lr=0.01`` or ``--optim.lr 0.01``) go on top.

Every problem is reported as a :class:`ConfigError` with one line that names the key and what
is valid (unknown keys list the valid ones), never a traceback from deep inside.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar, Union

__all__ = ["ConfigError", "from_dict", "to_dict", "load_config", "parse_overrides", "apply_overrides", "check_ranges"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot be used, with what would be valid."""


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, where: str, what: str = "config") -> Any:
    """``value`` checked (and, where lossless, converted) against the annotation ``hint``."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where, what)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}")
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {', '.join(_fields(hint))}, got {value!r}")
        return from_dict(hint, value, where, what)
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        items = [_coerce(v, args[0], f"{where}[{i}]", what) for i, v in enumerate(value)] if args else list(value)
        return tuple(items) if (origin is tuple or hint is tuple) else items
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], raw: Mapping[str, Any], where: str = "", what: str = "config") -> T:
    """Build dataclass ``cls`` from a (nested) mapping; unknown keys and ill-typed values raise
    :class:`ConfigError` naming the dotted key and the valid keys or values (``what`` names the
    kind of file in messages: "config", "recipe")."""
    fields = _fields(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        hint = _nested_hint(cls, unknown)
        raise ConfigError(f"unknown {what} key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"{'did you mean ' + hint + '? ' if hint else ''}valid keys"
                          f"{' of ' + where if where else ''}: {', '.join(fields)}")
    hints = _hints(cls)
    values = {name: _coerce(value, hints[name], f"{where}.{name}" if where else name, what) for name, value in raw.items()}
    try:
        obj = cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from err
    return obj


def _nested_hint(cls: type, unknown: list[str]) -> str:
    """The dotted keys one level down that ``unknown`` keys name (``lr`` → ``optim.lr``), for
    the error message: a top-level ``lr=...`` is the usual slip."""
    hints = _hints(cls)
    found = []
    for key in unknown:
        found += [f"{name}.{key}" for name in _fields(cls)
                  if dataclasses.is_dataclass(hints[name]) and key in _fields(hints[name])]
    return " / ".join(found)


def check_ranges(checks: list[tuple[str, Any, bool, str]]) -> None:
    """Raise :class:`ConfigError` naming every value out of range at once (a validator that
    lists all problems, as Opacus's do: one fix-up, not one per run), each as "key requirement,
    got value"; ``checks`` holds (key, value, whether it is in range, requirement)."""
    problems = [f"{key} {requirement}, got {value!r}" for key, value, ok, requirement in checks if not ok]
    if problems:
        raise ConfigError("; ".join(problems))


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as plain nested dicts and lists (YAML/JSON ready)."""
    return dataclasses.asdict(obj)


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``["optim.lr=0.01", "--epochs", "3", "--method.name=sam"]`` → ``[("optim.lr", 0.01),
    ("epochs", 3), ("method.name", "sam")]``; values are parsed as YAML scalars/lists."""
    import yaml

    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(items):
        item = items[i]
        if item.startswith("--"):
            body = item[2:]
            if "=" in body:
                key, text = body.split("=", 1)
            elif i + 1 < len(items) and not items[i + 1].startswith("--"):
                key, text = body, items[i + 1]
                i += 1
            else:
                raise ConfigError(f"option {item} needs a value (--key value or --key=value)")
        elif "=" in item:
            key, text = item.split("=", 1)
        else:
            raise ConfigError(f"override {item!r} must look like key=value (dotted keys for nested ones: optim.lr=0.01)")
        key = key.strip().replace("-", "_")
        if not key:
            raise ConfigError(f"override {item!r} has no key")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        out.append((key, value))
        i += 1
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """Set each dotted key in the nested mapping ``raw`` (creating levels as needed)."""
    for key, value in overrides:
        parts = key.split(".")
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None, what: str = "config") -> T:
    """Fill dataclass ``cls`` from the YAML file ``path`` (or only defaults with ``None``) and the
    command-line ``overrides``; ``what`` names the kind of file in messages."""
    import yaml

    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{what} file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from err
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path} is not a text file ({err.reason})") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of {what} keys, got {type(loaded).__name__}")
        raw = loaded
    raw = apply_overrides(raw, parse_overrides(list(overrides or [])))
    return from_dict(cls, raw, what=what)

"""Typed configuration: nested dataclasses loaded from YAML with dotted command-line overrides.

The dataclasses are the single source of truth. :func:`build` turns a plain dict (from YAML) into a
dataclass tree, coercing types, rejecting unknown keys (with the valid ones and a close-match
suggestion) and collecting *every* error before raising one :class:`ConfigError`.

Field help text lives in ``field(metadata={"help": ...})``; validation beyond types lives in each
dataclass's ``validate()`` method, which returns a list of ``(field, message)`` problems.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import UnbackdoorError


class ConfigError(UnbackdoorError, ValueError):
    """One or more configuration problems; ``problems`` lists ``(location, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        head = f"{len(problems)} configuration error(s)" + (f" in {source}" if source else "")
        lines = [f"  - {loc}: {msg}" if loc else f"  - {msg}" for loc, msg in problems]
        super().__init__(head + ":\n" + "\n".join(lines))


def help_field(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field carrying help text (shown by ``unbackdoor validate --explain``)."""
    if isinstance(default, (list, dict, set)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def suggest(value: Any, choices: Any) -> str:
    """`` Did you mean 'x'?`` for the closest of ``choices`` to ``value``, or an empty string."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


# ----------------------------------------------------------------------------------- coercion

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        if issubclass(tp, enum.Enum):
            return "one of " + ", ".join(repr(m.value) for m in tp)
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, loc: str, problems: list[tuple[str, str]]) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        sub: list[tuple[str, str]] = []
        for a in non_none:
            sub = []
            out = _coerce(value, a, loc, sub)
            if not sub:
                return out
        problems.extend(sub)
        return value
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and inner is not Any:
            value = [value]
        if not isinstance(value, (list, tuple)):
            problems.append((loc, f"expected a list, got {value!r}"))
            return value
        return [_coerce(v, inner, f"{loc}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append((loc, f"expected a mapping, got {value!r}"))
            return value
        _, inner = typing.get_args(tp) or (Any, Any)
        return {k: _coerce(v, inner, f"{loc}.{k}", problems) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            problems.append((loc, f"expected a section (mapping), got {value!r}"))
            return tp()
        return _build(tp, value, loc, problems)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        try:
            return tp(value)
        except ValueError:
            choices = [m.value for m in tp]
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append((loc, f"got {value!r}, expected one of {choices}{hint}"))
            return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        problems.append((loc, f"expected true/false, got {value!r}"))
        return value
    if tp is int:
        if isinstance(value, bool):
            problems.append((loc, f"expected an integer, got {value!r}"))
            return value
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        problems.append((loc, f"expected an integer, got {value!r}"))
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        problems.append((loc, f"expected a number, got {value!r}"))
        return value
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append((loc, f"expected a string, got {value!r}"))
        return value
    return value


def _build(cls: type, data: dict, loc: str, problems: list[tuple[str, str]]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{loc}.{key}" if loc else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            problems.append((where, f"unknown key.{hint} Valid keys here: {', '.join(fields)}"))
            continue
        kwargs[key] = _coerce(value, hints[key], where, problems)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append((f"{loc}.{name}" if loc else name, "required field is missing"))
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        problems.append((loc, str(exc)))
        return cls.__new__(cls)
    return obj


def _validate_tree(obj: Any, loc: str, problems: list[tuple[str, str]]) -> None:
    if not dataclasses.is_dataclass(obj):
        return
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            found = check()
        except Exception as exc:
            # A validator that trips over a value of the wrong type: that type error is already reported.
            already = any(p == loc or p.startswith(loc + ".") for p, _ in problems) if loc else bool(problems)
            found = [] if already else [("", f"could not validate: {exc}")]
        for fld, msg in found or []:
            problems.append((f"{loc}.{fld}" if loc and fld else (fld or loc), msg))
    for f in dataclasses.fields(obj):
        _validate_tree(getattr(obj, f.name, None), f"{loc}.{f.name}" if loc else f.name, problems)


def build(cls: type, data: dict | None, source: str | None = None) -> Any:
    """Build and validate a config dataclass tree from a plain mapping; raise ConfigError listing all problems."""
    problems: list[tuple[str, str]] = []
    obj = _build(cls, data or {}, "", problems)
    if dataclasses.is_dataclass(obj) and all(hasattr(obj, f.name) for f in dataclasses.fields(obj)):
        _validate_tree(obj, "", problems)
    if problems:
        raise ConfigError(problems, source)
    return obj


# ----------------------------------------------------------------------------------- YAML + overrides

def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=2e-5"`` -> (["train", "lr"], 2e-5). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError([(text, "an override must look like 'section.key=value'")])
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError([(text, "an override must look like 'section.key=value'")])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted ``key=value`` overrides to a nested dict (in place) and return it."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                node[part] = nxt
            node = nxt
        node[path[-1]] = value
    return data


def shipped_dir() -> Path:
    """The folder of the configs shipped inside the package (``unbackdoor/configs``; the repository's
    ``configs/`` is the same folder)."""
    return Path(str(resources.files("unbackdoor").joinpath("configs")))


def shipped_configs() -> list[str]:
    """Names of the shipped configs, e.g. ``crow/lab.yaml``."""
    root = shipped_dir()
    return sorted(str(p.relative_to(root)) for p in root.glob("*/*.yaml"))


def find_config(path: str | Path) -> Path:
    """``path`` when that file exists; else the shipped config it names (``configs/crow/lab.yaml``,
    ``crow/lab.yaml`` or ``crow/lab``), so that shipped configs work from any folder and from a wheel; else
    ``path`` unchanged (the caller reports it missing, with the shipped names)."""
    p = Path(path)
    if p.is_file() or p.is_absolute():
        return p
    parts = p.parts[1:] if p.parts and p.parts[0] == "configs" else p.parts
    if parts:
        cand = shipped_dir().joinpath(*parts)
        for c in (cand, cand.with_name(cand.name + ".yaml")):
            if c.is_file():
                return c
    return p


def load_yaml(path: str | Path) -> dict:
    path = find_config(path)
    if not path.is_file():
        close = difflib.get_close_matches(str(path).removeprefix("configs/"), shipped_configs(), n=1)
        hint = f" Did you mean the shipped config {close[0]!r}?" if close else ""
        raise ConfigError([(str(path), f"config file not found.{hint} Shipped configs: `unbackdoor ls configs`")])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError([(where, f"not valid YAML: {getattr(exc, 'problem', exc)}")]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([(str(path), f"the top level must be a mapping, got {type(data).__name__}")])
    return data


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain YAML/JSON-safe data (enums by value, paths as strings)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def explain(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every leaf field of a config dataclass tree."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(explain(tp, key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = to_dict(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = to_dict(f.default_factory())
        else:
            default = "(required)"
        rows.append((key, _type_name(tp), repr(default), f.metadata.get("help", "")))
    return rows


__all__ = [
    "ConfigError", "help_field", "suggest", "build", "apply_overrides", "parse_override", "load_yaml", "to_dict",
    "explain", "dataclass", "field", "find_config", "shipped_dir", "shipped_configs",
]

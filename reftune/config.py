"""Configs are plain dataclasses; a YAML file and `key=value` overrides fill them in.

Rules that keep runs reproducible and mistakes loud:
- an unknown key (in the file or an override) is an error that names the key and where it came from;
- a value of the wrong type is an error naming the key, the value and the expected type;
- every run folder gets `config.yaml` with the fully resolved config.
Nested sections (e.g. `data:`) are dataclasses too; overrides reach them with dots: `data.style=nl`.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says where and why."""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check `value` against a field's type; ints are accepted for floats."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", ())):
        for option in args:
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a {typ}")
    if typ is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if dataclasses.is_dataclass(typ):
        if value is None:  # an empty YAML section means "all defaults"
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {typ.__name__} fields, got {value!r}")
        return from_dict(typ, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") if args else v for i, v in enumerate(value)]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is Any or typ is object:
        return value
    if isinstance(typ, type):
        if typ is int and isinstance(value, bool):
            raise ConfigError(f"{where}: expected int, got {value!r}")
        if not isinstance(value, typ):
            raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r} ({type(value).__name__})")
    return value


def from_dict(cls: type[T], values: dict, where: str = "config") -> T:
    """Build `cls` from a dict, refusing unknown keys and wrong types."""
    types = _field_types(cls)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))} for {cls.__name__}; "
            f"known keys: {', '.join(sorted(types))}"
        )
    kwargs = {k: _coerce(v, types[k], f"{where}: key {k!r}") for k, v in values.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{at}: malformed YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, got {type(data).__name__}")
    return data


def apply_override(values: dict, override: str, cls) -> None:
    """Apply one `a.b=value` override to a nested dict (value parsed as YAML: 3, 1e-5, true, [1,2])."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value (e.g. lr=1e-5 or data.style=nl)")
    key, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-5 as a string (it wants 1.0e-5); accept it as a float.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") and value.strip() else value
        except ValueError:
            pass
    parts = key.strip().split(".")
    node, node_cls = values, cls
    for i, part in enumerate(parts):
        types = _field_types(node_cls)
        if part not in types:
            raise ConfigError(
                f"override {override!r}: unknown key {'.'.join(parts[:i + 1])!r}; known keys: {', '.join(sorted(types))}"
            )
        if i == len(parts) - 1:
            node[part] = value
        else:
            node_cls = types[part]
            if not dataclasses.is_dataclass(node_cls):
                raise ConfigError(f"override {override!r}: {part!r} has no sub-keys")
            child = node.get(part)
            if child is None:  # a missing or empty section (`data:` with nothing under it)
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part!r} is set to {child!r}, not a section of keys")
            node = child


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of `cls` <- YAML file <- overrides, validated."""
    values = read_yaml(path) if path else {}
    where = str(path) if path else "config"
    for o in overrides or []:
        apply_override(values, o, cls)
        where = f"{where} + overrides" if "overrides" not in where else where
    return from_dict(cls, values, where)


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

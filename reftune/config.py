"""Configs are plain dataclasses; a YAML file and `key=value` overrides fill them in.

Rules that keep runs reproducible and mistakes loud:
- an unknown key (in the file or an override) is an error that names the key and where it came from;
- a value of the wrong type is an error naming the key, the value and the expected type;
- every run folder gets `config.yaml` with the fully resolved config.
Nested sections (e.g. `data:`) are dataclasses too; overrides reach them with dots: `data.style=nl`.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
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
    values = _renamed_to_current(cls, values, types, where)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))} for {cls.__name__}; "
            f"known keys: {', '.join(sorted(types))}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        if (v is None or isinstance(v, dict)) and dataclasses.is_dataclass(types[k]):
            v = v or {}  # an empty YAML section: all of this class's defaults for it
            # A section given in part (`sft.lr=1e-4`) completes this class's own default for it (the
            # demo's SFT settings), not the section class's bare defaults.
            v = _merge(_default_section(fields[k]), v)
        kwargs[k] = _coerce(v, types[k], f"{where}: key {k!r}")
    return cls(**kwargs)


def _renamed_to_current(cls, values: dict, types: dict, where: str) -> dict:
    """Keys a config class renamed (its `renamed` table, old -> new) moved to their new name with
    a note: the old names keep working for one release. Both names at once is an error."""
    renamed = {old: new for old, new in getattr(cls, "renamed", {}).items() if old not in types}
    if not renamed.keys() & values.keys():
        return values
    values = dict(values)
    for old, new in renamed.items():
        if old in values:
            if new in values:
                raise ConfigError(f"{where}: {old!r} and {new!r} are both given; {old!r} is the old name of "
                                  f"{new!r} in {cls.__name__}: keep {new!r}")
            values[new] = values.pop(old)
            _note(f"{where}: key {old!r} is now called {new!r}; the old name is accepted until the next release")
    return values


def _note(message: str) -> None:
    print(f"reftune: note: {message}", file=sys.stderr, flush=True)


def _default_section(f: dataclasses.Field) -> dict:
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    elif f.default is not dataclasses.MISSING:
        default = f.default
    else:
        return {}
    return dataclasses.asdict(default) if dataclasses.is_dataclass(default) else {}


def _merge(base: dict, given: dict) -> dict:
    """`given` over `base`, nested dicts merged key by key."""
    out = dict(base)
    for k, v in given.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def to_dict(cfg) -> dict:
    """The config as plain data, each class's own fields before those of the sections it is composed
    of (so `config.yaml` starts with what the command is about: model, data, out_dir...)."""
    if not dataclasses.is_dataclass(cfg):
        return cfg
    names = [f.name for f in dataclasses.fields(cfg)]
    order = [n for klass in type(cfg).__mro__ for n in vars(klass).get("__annotations__", {}) if n in names]
    seen: dict = dict.fromkeys(order)
    return {n: _plain(getattr(cfg, n)) for n in seen}


def _plain(value):
    if dataclasses.is_dataclass(value):
        return to_dict(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return copy.deepcopy(value)


def read_text_utf8(path: str | Path, error: type[Exception] = ConfigError) -> str:
    """The file's text; bytes that are not UTF-8 are an `error` naming the file, line and byte."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise error(f"{path}: is a folder, not a file") from None
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise error(f"{path}: line {line}, column {column}: byte 0x{raw[e.start]:02x} is not valid UTF-8 "
                    f"(save the file as UTF-8)") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""


def _construct_unique_mapping(loader, node, deep=False):
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: let the default constructor report it
            continue
        first = seen.setdefault(key, key_node.start_mark.line + 1)
        if duplicate:
            raise ConfigError(f"{loader.name}: line {key_node.start_mark.line + 1}: duplicate key {key!r} "
                              f"(first given on line {first}); keep one")
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    text = read_text_utf8(path)
    try:
        loader = _UniqueKeyLoader(text)
        loader.name = str(path)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
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
        if part not in types and part in getattr(node_cls, "renamed", {}):
            parts[i] = part = _renamed_to_current(node_cls, {part: None}, types, f"override {override!r}").popitem()[0]
        if part not in types:
            raise ConfigError(
                f"override {override!r}: unknown key {'.'.join(parts[:i + 1])!r}; known keys: {', '.join(sorted(types))}"
            )
        if i == len(parts) - 1:
            # `out_dir=2024` or `hf_config=1.0` name text: YAML's number is not what was meant.
            if types[part] is str and isinstance(value, (int, float, bool)) and raw != "":
                value = raw
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


def explicit_keys(path: str | Path | None = None, overrides: list[str] | None = None) -> set[str]:
    """Dotted keys a config file and overrides set (`sft.epochs`, `data.n_train`): what a preset
    such as `demo --quick` must leave alone."""
    keys: set[str] = set()

    def walk(values: dict, prefix: str) -> None:
        for k, v in values.items():
            keys.add(prefix + str(k))
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")

    walk(read_yaml(path) if path else {}, "")
    keys.update(o.split("=", 1)[0].strip() for o in overrides or [] if "=" in o)
    return keys


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config atomically (temp file + rename): a kill leaves the old or the new one."""
    import os

    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)

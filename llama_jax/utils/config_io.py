"""Configs are data: dataclasses filled from YAML files and `key=value` command-line overrides.

One generic loader serves every config in the project (model, data, mesh, training): it walks the
dataclass fields, checks every value's type, rejects unknown keys, and names the offending key (with its
dotted path) in every error, so a typo fails at load time instead of deep inside compilation.

Three things YAML itself lets through are refused here, for every config at once: an empty file (which
would otherwise build the all-defaults config, a 6.7B model), a key given twice in one mapping (PyYAML
keeps the last silently) and a float field that is NaN or infinite (`.nan`, `.inf`: every float setting
is a rate, a size or a threshold, for which neither means anything).
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
_YAML11_FLOAT_MISS = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or contradicts another value."""


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key repeated within one mapping (`steps: 30` ... `steps: 40`)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden by its own keys
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                repeated = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class says so
                continue
            if repeated:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str):
    return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: builds plain data only


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check (and where lossless, convert) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: null is not allowed (expected {_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is Any:
        return value
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {tp.__name__}, got boolean {value!r}")
    # YAML 1.1 reads `3e-4` (no dot) as a string; users mean the number
    if tp is float and (isinstance(value, int) or isinstance(value, str) and _YAML11_FLOAT_MISS.fullmatch(value.strip())):
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float
            value = math.inf
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, type-checking every field and rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)  # YAML keys may be numbers or null too
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (valid keys: {', '.join(sorted(fields))})")
    kwargs = {name: _convert(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{prefix or cls.__name__ + ': '}{e}") from None
    except ConfigError as e:  # a cross-field check failed: say where the section sits in the whole config
        if prefix and not str(e).startswith(prefix):
            raise ConfigError(f"{prefix[:-1]}: {e}") from None
        raise


def check_choices(cfg: Any) -> None:
    """Every field of dataclass `cfg` whose metadata lists `choices` holds one of them (None aside).
    The list is the option's one definition: command-line flags generated from the field offer the same."""
    for f in dataclasses.fields(cfg):
        choices, value = f.metadata.get("choices"), getattr(cfg, f.name)
        if choices is not None and value is not None and value not in choices:
            raise ConfigError(f"{f.name}={value!r}; expected one of {', '.join(map(str, choices))}")


def json_type_problem(data: dict, schema: dict[str, tuple], where: str) -> str | None:
    """The first key of `data` whose value has the wrong JSON type, as a message, or None.

    `schema` maps keys to the allowed types among int, float (any finite number), bool, str, dict and
    None; absent keys are not checked. For files from outside (params.json, config.json), whose values
    are read with int()/float() later and must not be a list, a string or NaN by accident.
    """
    for key, allowed in schema.items():
        if key not in data:
            continue
        value = data[key]
        ok = ((value is None and None in allowed) or (int in allowed and type(value) is int)
              or (float in allowed and type(value) in (int, float) and math.isfinite(value))
              or any(t in allowed and type(value) is t for t in (bool, str, dict)))
        if not ok:
            names = " or ".join("null" if t is None else "number" if t is float else t.__name__ for t in allowed)
            return f"{where}: {key} is {value!r}; expected {names}"[:300]
    return None


def to_dict(cfg: Any) -> dict:
    """The plain-data form of a config, as written back to YAML next to checkpoints."""
    return dataclasses.asdict(cfg)


def load_yaml(path: str | Path) -> dict:
    """The mapping in a YAML file; a missing or empty file, bad UTF-8, bad YAML (a repeated key included)
    or a non-mapping is a ConfigError naming the file (and the line, for YAML errors)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = _parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {yaml_problem(e)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty (or only comments); expected a mapping of settings")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML parser error as one line: what went wrong and where (line and column, 1-based)."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(error, 'problem', None) or error}{where}".replace("\n", " ")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML, so numbers/bools/lists keep their type)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        return key.split("."), _parse_yaml(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError) as e:  # ValueError: a date that does not exist (`2021-02-30`)
        raise ConfigError(f"override {text!r}: invalid YAML value: {yaml_problem(e)}") from None
    except RecursionError:
        raise ConfigError(f"override {text[:80]!r}...: invalid YAML value: nested too deeply") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of the mapping `data` with every `key=value` override applied (nested by dots)."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        set_path(data, path, value, f"override {text!r}")
    return data


def set_path(data: dict, path: list[str], value: Any, what: str) -> None:
    """data[path[0]][path[1]]...[path[-1]] = value, creating the sections on the way; a section that is
    not a mapping is a ConfigError naming `what`."""
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: {part} is not a mapping")
        node = child
    node[path[-1]] = value

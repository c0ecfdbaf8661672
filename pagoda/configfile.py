"""Config files: YAML sections checked against dataclasses, and `section.key=value` overrides.

LitGPT's idea: a run is data, not code. Each section is a dataclass whose fields document the
knob where it is defined; loading checks every key and type against them, so a typo or an
impossible value stops the run at once with one line naming the field, not after an hour.
`pagoda pretrain`, `pagoda finetune` and `pagoda data prepare` all read their configs here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml

from pagoda.errors import ConfigError

Hint = Callable[[str, str], Any]  # (section, key) -> the declared type (Any when unknown)


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping of sections in a YAML file; one readable line when it is missing or broken."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {' '.join(str(exc).split())}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections")
    return {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...],
                    hint: Hint) -> None:
    """Set each `section.key=value` in `data`, the text typed by the field's declared type."""
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"override {item!r} must look like section.key=value, "
                              "e.g. optim.lr=3e-4")
        if not isinstance(data.setdefault(section, {}), dict):
            raise ConfigError(f"section {section!r} must be a mapping")
        data[section][name] = from_text(value.strip(), hint(section, name))


def check_sections(data: dict[str, Any], allowed: list[str]) -> None:
    """Reject unknown top-level sections, naming the allowed ones."""
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown config section(s) {', '.join(unknown)} "
                          f"(allowed: {', '.join(allowed)})")


def field_type(cls: type, name: str) -> Any:
    """The declared type of `cls.name` (Any for keys that will be rejected later)."""
    return typing.get_type_hints(cls).get(name, Any)


def build_section(cls: type, name: str, values: Any, **extra: Any) -> Any:
    """`cls(**values)` after checking every key and value; `extra` are fields built elsewhere
    (nested sections). A check in the dataclass's own `__post_init__` gets the section name."""
    if not isinstance(values, dict):
        raise ConfigError(f"section {name} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints) - set(extra))
    if unknown:
        allowed = [f.name for f in dataclasses.fields(cls) if f.name not in extra]
        raise ConfigError(f"unknown key {name}.{unknown[0]} (allowed: {', '.join(allowed)})")
    checked = {k: check(v, hints[k], f"{name}.{k}") for k, v in values.items()}
    try:
        return cls(**checked, **extra)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def options(hint: Any) -> tuple[Any, ...]:
    """The members of a union (X | None) or just (hint,)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def check(value: Any, hint: Any, key: str) -> Any:
    """`value` if it fits `hint` (ints widen to float, numeric strings such as YAML's '3e-4'
    become floats, lists become tuples), else a ConfigError naming the key."""
    for option in options(hint):
        ok, converted = _fits(value, option)
        if ok:
            return converted
    raise ConfigError(f"{key} must be {_describe(hint)}, got {value!r}")


def _fits(value: Any, hint: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True, value
    if hint is type(None):
        return value is None, None
    if origin is Literal:
        return value in typing.get_args(hint), value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                pass
        return False, value
    if hint is str:
        return isinstance(value, str), value
    if origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
            args = (args[0],) * len(value)
        if len(value) != len(args):
            return False, value
        pairs = [_fits(v, a) for v, a in zip(value, args, strict=True)]
        return all(ok for ok, _ in pairs), tuple(v for _, v in pairs)
    if origin is frozenset and isinstance(value, (list, tuple, set, frozenset)):
        (item_type,) = typing.get_args(hint) or (Any,)
        pairs = [_fits(v, item_type) for v in value]
        return all(ok for ok, _ in pairs), frozenset(v for _, v in pairs)
    if origin is dict and isinstance(value, dict):
        key_type, value_type = typing.get_args(hint) or (Any, Any)
        pairs = [(_fits(k, key_type), _fits(v, value_type)) for k, v in value.items()]
        return (all(k[0] and v[0] for k, v in pairs),
                {k[1]: v[1] for k, v in pairs})
    if origin is list:
        return isinstance(value, list), value
    return False, value


def _describe(hint: Any) -> str:
    names = []
    for option in options(hint):
        if typing.get_origin(option) is Literal:
            names.append("one of " + ", ".join(map(str, typing.get_args(option))))
        elif option is type(None):
            names.append("null")
        elif typing.get_origin(option) in (tuple, frozenset):
            names.append("a list")
        elif typing.get_origin(option) is dict:
            names.append("a mapping")
        else:
            names.append(getattr(option, "__name__", str(option)))
    return " or ".join(names)


def from_text(text: str, hint: Any) -> Any:
    """A command-line value typed by its field: YAML's reading when it fits, else the text
    itself for string fields, or a comma-separated list for tuples (betas=0.9,0.99)."""
    value = yaml.safe_load(text) if text else ""
    choices = options(hint)
    if any(_fits(value, option)[0] for option in choices):
        return value
    if str in choices:
        return text
    if any(typing.get_origin(option) in (tuple, frozenset) for option in choices):
        return [yaml.safe_load(part) for part in text.split(",") if part.strip()]
    return value  # check() names the field and the type it wanted

"""Checked config sections: a misspelt key, a wrong type or an out-of-range value fails at start, naming the key.

Two tools, plain Python (no Hydra, no Lightning):

- :func:`check_keys`: the keys of a config mapping must be among the valid ones; an unknown key raises a
  :class:`ConfigError` with its full path (``dino.optimizer.freeze_last_layr``) and the closest valid name.
- :func:`build_section`: a frozen dataclass from a config mapping. Its fields say what is valid: the type
  annotation (``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, ``tuple[float, float]``, ``tuple[float, ...]``
  or a nested dataclass) and, through :func:`option`, a default and a check of the value. A key without a default
  is required; ``null`` (None) for a key with a default means the default, as the code reading the dicts did.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

__all__ = [
    "ConfigError",
    "at_least",
    "build_section",
    "check_keys",
    "closest_name",
    "greater_than",
    "in_range",
    "increasing_pair",
    "option",
]

T = TypeVar("T")
Check = Callable[[Any], "str | None"]  # the value -> why it is wrong, or None


class ConfigError(ValueError):
    """A config value or key that cannot be used; the message names the key path and the fix."""


def closest_name(name: str, valid: Iterable[str]) -> str | None:
    """The valid name closest to ``name`` (a likely typo), or None when none is close."""
    matches = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.6)
    return matches[0] if matches else None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def check_keys(cfg: Mapping[str, Any], valid: Iterable[str], path: str = "") -> None:
    """Raise :class:`ConfigError` for the first key of ``cfg`` not in ``valid`` (sorted order), naming its path
    (``path`` + key), the closest valid name and every valid key."""
    valid = sorted(valid)
    unknown = sorted(set(map(str, cfg)) - set(valid))
    if not unknown:
        return
    key = unknown[0]
    guess = closest_name(key, valid)
    hint = f" (did you mean {_join(path, guess)}?)" if guess else ""
    others = f"; also unknown: {', '.join(unknown[1:])}" if len(unknown) > 1 else ""
    where = f" of {path}" if path else ""
    raise ConfigError(f"unknown config key {_join(path, key)}{hint}{others}. Valid keys{where}: {', '.join(valid)}")


# ------------------------------------------------------------------------------------------------ typed sections
def option(default: Any = dataclasses.MISSING, check: Check | None = None) -> Any:
    """A dataclass field for :func:`build_section`: ``default`` (none: the key is required) and ``check``."""
    metadata = {"check": check} if check is not None else {}
    return dataclasses.field(default=default, metadata=metadata)


def in_range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Check:
    """Every number of the value (one, or each of a tuple) in ``[lo, hi]`` (``(`` / ``)`` where open)."""

    def check(value: Any) -> str | None:
        values = value if isinstance(value, tuple) else (value,)
        ok = all((lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi) for v in values)
        return None if ok else f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    return check


def at_least(lo: float) -> Check:
    """The number is ``>= lo``."""
    return lambda value: None if value >= lo else f"must be >= {lo:g}"


def greater_than(lo: float) -> Check:
    """The number is ``> lo``."""
    return lambda value: None if value > lo else f"must be > {lo:g}"


def increasing_pair(lo: float, hi: float | None = None, lo_open: bool = False) -> Check:
    """A ``(min, max)`` pair with ``lo <= min <= max <= hi`` (``lo < min`` where ``lo_open``; no ``hi``: unbounded)."""

    def check(value: tuple[float, float]) -> str | None:
        a, b = value
        ok = (lo < a if lo_open else lo <= a) and a <= b and (hi is None or b <= hi)
        bound = f" <= {hi:g}" if hi is not None else ""
        return None if ok else f"must be [min, max] with {lo:g} {'<' if lo_open else '<='} min <= max{bound}"

    return check


_NAMES = {
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    bool: ("true or false", "booleans"),
    str: ("a string", "strings"),
}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        plural = _NAMES.get(args[0], (None, str(args[0])))[1]
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {plural}"
        return f"a list of {len(args)} {plural}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return _NAMES.get(tp, (str(tp),))[0]


class _WrongType(Exception):
    pass


def _convert(value: Any, tp: Any, path: str) -> Any:
    """``value`` as type ``tp`` (int -> float allowed, nothing else converted), or :class:`_WrongType`."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if value is not None and not isinstance(value, Mapping):
            raise _WrongType
        return build_section(tp, value or {}, path)
    if origin is typing.Literal:
        if not any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            raise _WrongType
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
            raise _WrongType
        args = typing.get_args(tp)
        kinds = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(kinds) != len(value):
            raise _WrongType
        return tuple(_convert(v, k, f"{path}[{i}]") for i, (v, k) in enumerate(zip(value, kinds, strict=True)))
    if tp is bool:
        if not isinstance(value, bool):
            raise _WrongType
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _WrongType
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _WrongType
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _WrongType
        return value
    raise TypeError(f"{path}: unsupported field type {tp!r}")  # a programming error in the dataclass


def build_section(cls: type[T], cfg: Mapping[str, Any] | None, path: str) -> T:
    """The dataclass ``cls`` from the config mapping ``cfg`` found at ``path`` (e.g. ``dino.loss``), checked.

    Raises :class:`ConfigError` naming the key for an unknown key (with the closest valid name), a required key
    that is missing, a value of the wrong type or one its field's check refuses.
    """
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{path or 'the config'} must be a mapping, got {type(cfg).__name__}: {cfg!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    check_keys(cfg, fields, path)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(path, name)
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        value = cfg.get(name)
        if value is None:
            if not has_default:
                raise ConfigError(f"{key} is required ({_type_name(hints[name])})")
            if not dataclasses.is_dataclass(hints[name]):
                continue  # the field's default
        try:
            converted = _convert(value, hints[name], key)
        except _WrongType:
            raise ConfigError(f"{key} must be {_type_name(hints[name])}, got {value!r}") from None
        check = f.metadata.get("check")
        why = check(converted) if check is not None else None
        if why:
            raise ConfigError(f"{key}={value!r}: {why}")
        values[name] = converted
    return cls(**values)

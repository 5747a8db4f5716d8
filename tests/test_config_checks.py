"""The config-checking helper alone: unknown keys with the closest valid name, typed sections with defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from surgenet_ssl.config.checks import ConfigError, build_section, check_keys, closest_name, in_range, option


def test_closest_name():
    assert closest_name("fracton", ["fraction", "name", "path"]) == "fraction"
    assert closest_name("zzz", ["fraction", "name", "path"]) is None


def test_check_keys_names_path_closest_and_all_valid_keys():
    check_keys({"a": 1, "alpha": 2}, {"a", "alpha", "beta"}, "x")  # all valid: nothing
    with pytest.raises(ConfigError) as err:
        check_keys({"alhpa": 1, "zzz": 2}, {"a", "alpha", "beta"}, "x.y")
    assert str(err.value) == (
        "unknown config key x.y.alhpa (did you mean x.y.alpha?); also unknown: zzz. Valid keys of x.y: a, alpha, beta"
    )
    with pytest.raises(ConfigError, match=r"^unknown config key fracton \(did you mean fraction\?\)"):
        check_keys({"fracton": 1}, {"fraction"})  # no path: the key alone


@dataclass(frozen=True)
class Inner:
    size: int = option(3, in_range(1, 10))


@dataclass(frozen=True)
class Outer:
    rate: float = option()
    mode: Literal["a", "b"] = option("a")
    pair: tuple[float, float] = option((0.0, 1.0))
    many: tuple[int, ...] = option((1,))
    inner: Inner = field(default_factory=Inner)


def test_build_section_types_defaults_and_nesting():
    built = build_section(Outer, {"rate": 1, "pair": [2, 3], "many": [4, 5, 6], "inner": {"size": 9}}, "o")
    assert built == Outer(rate=1.0, mode="a", pair=(2.0, 3.0), many=(4, 5, 6), inner=Inner(9))
    assert isinstance(built.rate, float)
    assert build_section(Outer, {"rate": 0.5, "mode": None, "inner": None}, "o") == Outer(rate=0.5)


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({}, "o.rate is required (a number)"),
        ({"rate": 1, "inner": {"sise": 2}}, "unknown config key o.inner.sise (did you mean o.inner.size?)"),
        ({"rate": 1, "inner": {"size": 11}}, "o.inner.size=11: must be in [1, 10]"),
        ({"rate": 1, "many": [1, 2.5]}, "o.many must be a list of integers, got [1, 2.5]"),
        ({"rate": 1, "pair": "ab"}, "o.pair must be a list of 2 numbers, got 'ab'"),
        ({"rate": 1, "mode": "c"}, "o.mode must be 'a' or 'b', got 'c'"),
        ({"rate": False}, "o.rate must be a number, got False"),
    ],
)
def test_build_section_errors_name_the_key(cfg, message):
    with pytest.raises(ConfigError) as err:
        build_section(Outer, cfg, "o")
    assert message in str(err.value)


def test_a_section_that_is_not_a_mapping():
    with pytest.raises(ConfigError, match="o must be a mapping, got list"):
        build_section(Outer, [1, 2], "o")  # type: ignore[arg-type]

"""The ``dataset`` config's keys are checked before anything is read: a misspelt key names the closest valid one."""

from __future__ import annotations

from pathlib import Path

import pytest

from data.data_media import write_source
from surgenet_ssl.config.checks import ConfigError
from surgenet_ssl.data.mixture import resolve_mixture


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = tmp_path_factory.mktemp("prepared")
    write_source(r, "a", videos=1, frames_per_video=4, shard_max=10)
    write_source(r, "b", videos=1, frames_per_video=4, shard_max=10)
    return r


@pytest.mark.parametrize(
    "key, closest",
    [
        ("fracton", "dataset.fraction"),
        ("allow_mising", "dataset.allow_missing"),
        ("source", "dataset.sources"),
        ("generat", "dataset.generate"),
    ],
)
def test_a_misspelt_dataset_key_fails_with_the_closest_valid_name(key, closest, tmp_path):
    with pytest.raises(ConfigError) as err:
        resolve_mixture({"name": "x", "sources": {"a": None}, key: 1}, tmp_path / "nothing-here")
    message = str(err.value)
    assert f"unknown config key dataset.{key} (did you mean {closest}?)" in message
    valid = "allow_missing, curated, description, exclude_videos, fraction, generate, name, path, root, sources"
    assert f"Valid keys of dataset: {valid}" in message


def test_a_misspelt_key_of_a_source_entry_fails_with_the_closest_valid_name(root):
    with pytest.raises(ConfigError, match=r"sources\.a\.wieght \(did you mean dataset\.sources\.a\.weight\?\)"):
        resolve_mixture({"name": "ab", "sources": {"a": {"wieght": 2.0}, "b": {"weight": 1.0}}}, root)
    with pytest.raises(ValueError, match=r"dataset\.sources\.b\.paht \(did you mean dataset\.sources\.b\.path\?\)"):
        resolve_mixture({"name": "ab", "sources": {"a": 1.0, "b": {"paht": str(root / "b")}}}, root)


def test_every_valid_key_is_accepted(root):
    sources = {"a": {"weight": 3.0}, "b": {"weight": 1.0, "path": str(root / "b")}}
    mixture = resolve_mixture(
        {
            "name": "ab",
            "description": "two sources",
            "sources": sources,
            "fraction": 1.0,
            "allow_missing": False,
            "root": str(root),
            "path": None,
            "generate": None,
        },
        "/unused",
    )
    assert [(s.name, s.weight) for s in mixture.sources] == [("a", 0.75), ("b", 0.25)]


def test_value_errors_keep_their_messages(root):
    with pytest.raises(ValueError, match="fraction"):
        resolve_mixture({"name": "ab", "sources": {"a": None}, "fraction": 0.0}, root)
    with pytest.raises(ValueError, match="every source or to none"):
        resolve_mixture({"name": "ab", "sources": {"a": 2.0, "b": None}}, root)

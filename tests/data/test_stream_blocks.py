"""The loader's stream building blocks alone: ``sample_stream`` (sources drawn by weight, samples without a JPEG
skipped and counted) and ``shuffle_buffer`` (a bounded shuffle that loses and duplicates nothing)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest

from surgenet_ssl.data.loader import sample_stream, shuffle_buffer


class FakeReader:
    """A source reader as ``sample_stream`` uses it: ``spec.name``, ``next()`` and ``problem()``."""

    def __init__(self, name: str, without_jpg_every: int = 0) -> None:
        self.spec = SimpleNamespace(name=name)
        self.without_jpg_every = without_jpg_every
        self.served = 0
        self.problems: list[tuple[str, str]] = []

    def next(self) -> tuple[str, dict[str, bytes]]:
        i = self.served
        self.served += 1
        key = f"video/{i:06d}"
        if self.without_jpg_every and i % self.without_jpg_every == 0:
            return key, {"json": b"{}"}  # e.g. a sample whose image member is missing
        return key, {"jpg": f"{self.spec.name}:{i}".encode(), "json": b"{}"}

    def problem(self, stat: str, message: str, shard: int | None = None) -> None:
        self.problems.append((stat, message))


def _draw(weights: list[float], n: int, seed: int = 0) -> list[tuple[int, str, bytes]]:
    readers = [FakeReader(f"s{i}") for i in range(len(weights))]
    return list(itertools.islice(sample_stream(readers, weights, np.random.default_rng(seed)), n))


# -------------------------------------------------------------------------------------------------- sample_stream
def test_sources_are_drawn_in_proportion_to_their_weights():
    weights, n = [1.0, 2.0, 7.0], 20_000
    counts = np.bincount([i for i, _, _ in _draw(weights, n)], minlength=3)
    expected = n * np.array(weights) / sum(weights)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 13.82, (counts, expected)  # chi-square, 2 degrees of freedom, p = 0.001
    assert np.allclose(counts / n, np.array(weights) / sum(weights), atol=0.015)


def test_weights_need_not_be_normalised_and_a_zero_weight_source_is_never_drawn():
    assert [i for i, _, _ in _draw([2.0, 6.0], 500)] == [i for i, _, _ in _draw([0.25, 0.75], 500)]
    assert {i for i, _, _ in _draw([1.0, 0.0, 1.0], 2_000)} == {0, 2}


def test_items_name_their_source_and_come_in_each_readers_order():
    items = _draw([1.0, 1.0], 200)
    for i, key, jpg in items:
        name, local = key.split("/", 1)
        assert name == f"s{i}" and jpg == f"s{i}:{int(local.split('/')[1])}".encode()
    for source in (0, 1):  # each reader's samples in the order the reader served them
        served = [int(key.rsplit("/", 1)[1]) for i, key, _ in items if i == source]
        assert served == list(range(len(served)))


def test_same_seed_same_stream_other_seed_other_stream():
    assert _draw([1.0, 3.0], 300, seed=5) == _draw([1.0, 3.0], 300, seed=5)
    assert _draw([1.0, 3.0], 300, seed=5) != _draw([1.0, 3.0], 300, seed=6)


def test_samples_without_a_jpg_member_are_skipped_and_counted_on_their_reader():
    broken, fine = FakeReader("broken", without_jpg_every=3), FakeReader("fine")
    items = list(itertools.islice(sample_stream([broken, fine], [1.0, 1.0], np.random.default_rng(0)), 300))
    assert len(items) == 300 and all(jpg for _, _, jpg in items)
    from_broken = [key for i, key, _ in items if i == 0]
    assert from_broken and all(int(key.rsplit("/", 1)[1]) % 3 != 0 for key in from_broken)  # no jpg: never out
    skipped = (broken.served + 2) // 3  # served samples 0, 3, 6, ... had no jpg
    assert len(broken.problems) == skipped > 0 and fine.problems == []
    stat, message = broken.problems[0]
    assert stat == "corrupt_images" and "video/000000" in message and "no .jpg member" in message


# ------------------------------------------------------------------------------------------------- shuffle_buffer
def _shuffled(items: list, size: int, seed: int = 0) -> list:
    return list(shuffle_buffer(iter(items), size, np.random.default_rng(seed)))


@pytest.mark.parametrize("size", [2, 7, 64, 1000, 5000])
def test_a_finite_stream_comes_out_as_a_permutation_of_itself(size):
    items = list(range(1000))
    out = _shuffled(items, size)
    assert len(out) == len(items) and sorted(out) == items  # nothing lost, nothing duplicated
    assert out != items  # and it was shuffled


def test_output_k_is_one_of_the_first_k_plus_size_inputs_of_an_endless_stream():
    size, n = 16, 2_000
    out = list(itertools.islice(shuffle_buffer(itertools.count(), size, np.random.default_rng(1)), n))
    assert len(set(out)) == n  # no duplicates in the prefix
    assert all(item < k + size for k, item in enumerate(out))
    assert max(abs(item - k) for k, item in enumerate(out)) > size // 2  # items do move


@pytest.mark.parametrize("size", [-3, 0, 1])
def test_size_one_or_less_passes_the_stream_through_without_drawing(size):
    rng = np.random.default_rng(3)
    before = rng.bit_generator.state
    assert list(shuffle_buffer(iter("abcdef"), size, rng)) == list("abcdef")
    assert rng.bit_generator.state == before


def test_same_seed_same_order_other_seed_other_order():
    items = list(range(500))
    assert _shuffled(items, 32, seed=7) == _shuffled(items, 32, seed=7)
    assert _shuffled(items, 32, seed=7) != _shuffled(items, 32, seed=8)


def test_items_are_passed_as_they_are():
    items = [(i, f"s/{i}", bytes([i])) for i in range(50)]  # what sample_stream yields
    out = _shuffled(items, 8)
    assert sorted(out) == items and all(any(o is it for it in items) for o in out)

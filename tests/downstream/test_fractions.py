"""Low-data fractions: deterministic, nested, by video where there are videos, stratified by class otherwise."""

from __future__ import annotations

import pytest

from surgenet_ssl.downstream.fractions import select_fraction, stable_rank_key


def test_by_group_keeps_whole_videos_nested_and_deterministic():
    groups = [f"video{v:02d}" for v in range(20) for _ in range(5)]
    keys = [f"{g}/{i}" for i, g in enumerate(groups)]
    kept10, by = select_fraction(keys, 0.1, groups)
    assert by == "group"
    videos10 = {groups[i] for i in kept10}
    assert len(videos10) == 2 and len(kept10) == 10  # ceil(0.1 x 20) videos, with all their frames
    kept25, _ = select_fraction(keys, 0.25, groups)
    assert {groups[i] for i in kept25} >= videos10 and len({groups[i] for i in kept25}) == 5  # nested
    assert select_fraction(keys, 0.1, list(groups))[0] == kept10  # the same on every call / machine
    # membership is the hash rank of the video names, not their listing order
    ranked = sorted(set(groups), key=stable_rank_key)
    assert videos10 == set(ranked[:2])
    assert select_fraction(keys, 1.0, groups) == (list(range(100)), "group")


def test_by_sample_is_stratified_per_class_with_at_least_one_each():
    labels = [0] * 50 + [1] * 30 + [2] * 2
    keys = [f"img{i}" for i in range(len(labels))]
    kept, by = select_fraction(keys, 0.1, groups=None, strata=labels)
    assert by == "sample"
    per_class = {c: sum(1 for i in kept if labels[i] == c) for c in (0, 1, 2)}
    assert per_class == {0: 5, 1: 3, 2: 1}
    kept50, _ = select_fraction(keys, 0.5, strata=labels)
    assert set(kept) <= set(kept50) and kept == sorted(kept)


def test_fraction_options_and_errors():
    keys, groups = ["a", "b", "c"], ["v1", None, "v2"]
    assert select_fraction(keys, 0.5, groups)[1] == "sample"  # not every sample has a video
    with pytest.raises(ValueError, match="fraction_by=group"):
        select_fraction(keys, 0.5, groups, by="group")
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        select_fraction(keys, 0.0)
    with pytest.raises(ValueError, match="auto, group or sample"):
        select_fraction(keys, 0.5, by="video")
    one_video = ["v1"] * 3
    assert select_fraction(keys, 0.5, one_video)[1] == "sample"  # a single video cannot be subsampled by video

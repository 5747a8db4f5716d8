"""The online k-NN monitor's labelled set built from prepared sources (split by video, frames spread evenly)."""

from __future__ import annotations

from pathlib import Path

from surgenet_ssl.callbacks.knn_monitor import frames_by_source
from surgenet_ssl.data.demo import ensure_demo_dataset
from surgenet_ssl.data.mixture import resolve_mixture
from surgenet_ssl.evaluation import eval_transform


def test_sets_split_by_video_and_spread_over_videos(demo_cache: Path):
    ensure_demo_dataset(demo_cache)
    mixture = resolve_mixture(
        {
            "name": "demo",
            "generate": "demo",
            "root": str(demo_cache),
            "sources": None,
            "fraction": 1.0,
            "allow_missing": False,
            "path": None,
        },
        demo_cache,
    )
    memory, query, names = frames_by_source(mixture.sources, max_per_class=10, transform=eval_transform(32))
    assert names == [s.name for s in mixture.sources] and len(names) == 3
    # 3 videos per demo procedure: 2 memory videos x 5 frames, the last video gives 10 query frames.
    assert [memory.labels.count(i) for i in range(3)] == [10, 10, 10]
    assert [query.labels.count(i) for i in range(3)] == [10, 10, 10]
    assert memory.images[0].shape == (3, 32, 32)
    # Memory frames spread over both memory videos (5 each), queries from the held-out last video only.
    first = [v for v, y in zip(memory.videos, memory.labels, strict=True) if y == 0]
    assert sorted({v: first.count(v) for v in first}.values()) == [5, 5]
    held_out = {v for v, y in zip(query.videos, query.labels, strict=True) if y == 0}
    assert len(held_out) == 1 and not held_out & set(first)

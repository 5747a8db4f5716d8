"""sampling=epoch: every frame once per epoch on any number of ranks and workers, determinism, repeat factors,
shuffle quality (issue targets), elastic resume, and the plan alone (surgenet_ssl.data.epochs)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import to_tensor

from data.data_media import write_source
from surgenet_ssl.data.epochs import Catalog, epoch_order, epoch_steps, rank_batch_positions
from surgenet_ssl.data.loader import build_train_loader
from surgenet_ssl.data.shard_index import index_path, load_index, scan_tar


def one_crop(img: Image.Image) -> list[torch.Tensor]:
    return [to_tensor(img)]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = tmp_path_factory.mktemp("epochs")
    write_source(r, "a", videos=3, frames_per_video=21, shard_max=8)  # 9 shards, 63 frames
    write_source(r, "b", videos=1, frames_per_video=17, shard_max=100)  # 1 shard, 17 frames
    return r


def cfg(**kw) -> dict:
    return {"name": "ab", "sources": {"a": None, "b": None}} | kw


def epoch_keys(root: Path, world: int, workers: int, batch: int = 4, epoch: int = 0, **kw) -> list[list[str]]:
    """Per rank, the keys of one epoch in the order the rank trains on them."""
    out = []
    for rank in range(world):
        loader = build_train_loader(
            kw.pop("dataset", cfg()) if rank == 0 else cfg(),
            root,
            one_crop,
            batch_size=batch,
            num_workers=workers,
            rank=rank,
            world_size=world,
            epoch=epoch,
            **kw,
        )
        out.append([k for b in loader for k in b["key"]])
    return out


ALL = {f"a/v{v:02d}/{k:08d}" for v in range(3) for k in range(21)} | {f"b/v00/{k:08d}" for k in range(17)}


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (3, 2), (4, 1)])
def test_every_frame_once_per_epoch_whatever_the_ranks_and_workers(root: Path, world: int, workers: int) -> None:
    per_rank = epoch_keys(root, world, workers)
    steps = 80 // (4 * world)  # the incomplete last global batch is dropped
    assert all(len(keys) == 4 * steps for keys in per_rank)  # every rank the same number of batches
    seen = [k for keys in per_rank for k in keys]
    assert len(seen) == len(set(seen)) == steps * 4 * world  # nothing twice
    assert set(seen) <= ALL and len(ALL - set(seen)) == 80 - steps * 4 * world  # only the dropped tail is missing


def test_same_seed_and_epoch_same_global_order_on_any_layout(root: Path) -> None:
    one = epoch_keys(root, 1, 0, batch=4)[0]
    assert one == epoch_keys(root, 1, 2, batch=4)[0]  # workers do not change the order
    two = epoch_keys(root, 2, 2, batch=2)  # global batch of 4 again: rank r takes half of each global batch
    merged = [k for t in range(len(two[0]) // 2) for r in (0, 1) for k in two[r][2 * t : 2 * t + 2]]
    assert merged == one
    assert epoch_keys(root, 1, 0, epoch=1)[0] != one and epoch_keys(root, 1, 0, seed=1)[0] != one


def test_weights_are_per_epoch_repeat_factors(root: Path) -> None:
    weighted = cfg(sources={"a": 1.0, "b": 1.0})  # shares 1:1 of 80 frames: b x 40/17, a x 40/63
    loader = build_train_loader(weighted, root, one_crop, batch_size=4, num_workers=0)
    ds = loader.dataset
    assert ds.repeats["b"] == pytest.approx(40 / 17) and ds.repeats["a"] == pytest.approx(40 / 63)
    epochs = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        counts = Counter(k for b in loader for k in b["key"])
        b_counts = [c for k, c in counts.items() if k.startswith("b/")]
        a_counts = [c for k, c in counts.items() if k.startswith("a/")]
        assert set(b_counts) <= {2, 3} and len(b_counts) == 17  # each b frame twice, a seeded 0.35 of them thrice
        assert set(a_counts) == {1} and len(a_counts) <= 40  # a: a seeded subset, each at most once
        epochs.append({k for k in counts if k.startswith("a/")})
    assert epochs[0] != epochs[1]  # another subset each epoch


def test_fraction_epochs_use_the_kept_frames_once(root: Path) -> None:
    from surgenet_ssl.data.shards import keep_frame

    kept = {k for k in ALL if keep_frame(k.split("/", 1)[0], k.split("/", 1)[1], 0.5)}
    loader = build_train_loader(cfg(fraction=0.5), root, one_crop, batch_size=1, num_workers=0)
    keys = [k for b in loader for k in b["key"]]
    assert len(keys) == len(set(keys)) == len(kept) and set(keys) == kept


# ------------------------------------------------------------------------------------------- the plan alone
def videos_catalog(videos: int, frames: int) -> Catalog:
    """One shard per video (as prepare writes a video of <= shard_max_frames frames)."""
    return Catalog(np.zeros(videos, np.int64), np.full(videos, frames, np.int64), [None] * videos, [1.0])


def test_batches_mix_as_many_videos_as_random_sampling() -> None:
    cat = videos_catalog(100, 200)
    order = epoch_order(cat, seed=0, epoch=0, block=65536)
    shards = np.searchsorted(cat.shard_base, order, side="right") - 1
    distinct = [len(set(shards[i : i + 64].tolist())) for i in range(0, len(order) - 63, 64)]
    assert np.mean(distinct) >= 38  # target of issue 28 (uniform random sampling: 47.4; resampled shards: 14.5)
    small_block = epoch_order(cat, seed=0, epoch=0, block=4000)  # 20 videos per block: bounded, fewer videos
    shards = np.searchsorted(cat.shard_base, small_block, side="right") - 1
    assert 12 < np.mean([len(set(shards[i : i + 64].tolist())) for i in range(0, 19_968, 64)]) < 38


def test_second_half_of_the_videos_gets_half_of_the_samples_on_8_ranks_x_2_workers() -> None:
    cat = videos_catalog(16, 500)
    batch, world, workers = 8, 8, 2
    steps = epoch_steps(cat.epoch_size(), batch, world, None)
    order = epoch_order(cat, seed=3, epoch=0, block=65536)
    ordinals = []
    for rank in range(world):
        for worker in range(workers):
            for t in range(worker, steps, workers):
                for p in rank_batch_positions(0, t, rank, world, batch):
                    ordinals.append(cat.locate(int(order[p]))[1])
    assert len(ordinals) == steps * batch * world == 8000
    assert abs(np.mean(np.array(ordinals) >= 250) - 0.5) <= 0.05  # issue 28: 0.50 +- 0.05 (resampled before: 0.00)


def test_elastic_resume_from_4_to_2_ranks_repeats_and_skips_nothing() -> None:
    cat = videos_catalog(7, 37)
    order = epoch_order(cat, seed=1, epoch=5, block=50)
    b = 4
    done = 3  # global batches of 4 ranks done before the interruption
    before = [p for t in range(done) for r in range(4) for p in rank_batch_positions(0, t, r, 4, b)]
    offset = done * b * 4
    steps2 = (epoch_steps(len(order), b, 2, None) * b * 2 - offset) // (b * 2)
    after = [p for t in range(steps2) for r in range(2) for p in rank_batch_positions(offset, t, r, 2, b)]
    frames = [int(order[p]) for p in before + after]
    assert len(frames) == len(set(frames)) == len(order) // 8 * 8  # every frame of the epoch once, none twice


@pytest.mark.parametrize("workers", [0, 2])
def test_elastic_resume_with_the_loader(root: Path, workers: int) -> None:
    """4 ranks train 2 global batches; the run resumes on 2 ranks at the same epoch position."""
    full = epoch_keys(root, 4, 0, batch=2)  # 4 ranks x 2 = global batch 8: 10 steps
    first = [k for t in range(2) for r in range(4) for k in full[r][2 * t : 2 * t + 2]]
    rest = []
    for rank in range(2):
        loader = build_train_loader(
            cfg(),
            root,
            one_crop,
            batch_size=4,
            num_workers=workers,
            rank=rank,
            world_size=2,
            resume_position={"epoch": 0, "epoch_samples": 16, "batches": 0, "workers": {}},
        )
        batches = list(loader)
        assert len(batches) == (80 - 16) // 8
        rest.append([k for b in batches for k in b["key"]])
    seen = first + rest[0] + rest[1]
    assert len(seen) == len(set(seen)) == 80 and set(seen) == ALL


def test_order_is_the_same_for_the_same_seed_and_epoch_only() -> None:
    cat = videos_catalog(5, 30)
    a = epoch_order(cat, 0, 0, 40)
    assert np.array_equal(a, epoch_order(cat, 0, 0, 40)) and sorted(a.tolist()) == list(range(150))
    assert not np.array_equal(a, epoch_order(cat, 0, 1, 40)) and not np.array_equal(a, epoch_order(cat, 1, 0, 40))


# ------------------------------------------------------------------------------------------- shard indexes
def test_prepare_writes_an_index_and_old_shards_get_one_built_and_cached(root: Path, tmp_path: Path) -> None:
    shard = root / "a" / "shards" / "v00-00000.tar"
    sidecar = index_path(shard)
    assert sidecar.is_file() and load_index(shard) == scan_tar(shard)
    index = scan_tar(shard)
    assert len(index) == 8 and index.keys[0] == "v00/00000000" and index.complete
    old = tmp_path / "old.tar"
    old.write_bytes(shard.read_bytes())  # a shard prepared before indexes: none beside it
    cache = tmp_path / "cache"
    assert load_index(old, cache) == index and len(list(cache.glob("*.idx.json"))) == 1
    half = tmp_path / "half.tar"
    half.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    cut = scan_tar(half)
    assert 0 < len(cut) < 8 and cut.keys == index.keys[: len(cut)]

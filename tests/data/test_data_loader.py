"""Streaming loader: batch contract, equal steps per rank/worker, weights, seeding, fraction, bad data, errors."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms.functional import to_tensor

from data.data_media import tiny_jpeg, truncate, write_source
from surgenet_ssl.data.loader import MixtureStream, build_train_loader
from surgenet_ssl.data.mixture import MissingSourcesError
from surgenet_ssl.data.shards import keep_frame


def two_crops(img: Image.Image) -> list[torch.Tensor]:
    assert img.mode == "RGB"
    return [to_tensor(img), to_tensor(img.resize((4, 4)))]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = tmp_path_factory.mktemp("prepared")
    write_source(r, "a", videos=2, frames_per_video=30, shard_max=10)  # 6 shards, 60 frames
    write_source(r, "b", videos=1, frames_per_video=20, shard_max=100)  # 1 shard, 20 frames
    return r


def cfg(**kw) -> dict:
    return {"name": "ab", "sources": {"a": None, "b": None}, "fraction": 1.0, "allow_missing": False} | kw


def keys_of(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def test_batch_contract(root: Path) -> None:
    loader = build_train_loader(cfg(), root, two_crops, batch_size=8, num_workers=0, shuffle_buffer=16)
    ds = loader.dataset
    assert isinstance(ds, MixtureStream)
    assert ds.sources == ["a", "b"] and ds.frames_per_source == {"a": 60, "b": 20}
    assert len(loader) == ds.steps_per_epoch == 80 // 8
    batches = list(loader)
    assert len(batches) == 10
    b = batches[0]
    assert set(b) == {"crops", "source", "key", "position"}
    assert b["position"].tolist() == [0, 0, 1, 8]  # epoch, worker, batches of that worker, stream items it used
    assert [c.shape for c in b["crops"]] == [(8, 3, 10, 12), (8, 3, 4, 4)] and b["crops"][0].dtype == torch.float32
    assert b["source"].dtype == torch.long and b["source"].shape == (8,)
    for label, key in zip(b["source"].tolist(), b["key"], strict=True):
        assert key.startswith(ds.sources[label] + "/")  # "<source>/<video>/<frame>"
    assert ds.stats["samples"] == 80 and ds.stats["batches"] == 10 and ds.stats["corrupt_images"] == 0
    with_workers = build_train_loader(cfg(), root, two_crops, batch_size=8, num_workers=2, shuffle_buffer=16)
    assert sum(len(b["key"]) for b in with_workers) == 80
    assert with_workers.dataset.stats["samples"] == 80  # counted in the workers, visible in the main process


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_rank_gets_the_same_number_of_steps_with_fewer_shards_than_readers(root: Path, num_workers: int) -> None:
    only_b = cfg(sources={"b": None})  # one shard for 3 ranks x 2 workers
    lengths = set()
    for rank in range(3):
        loader = build_train_loader(
            only_b,
            root,
            two_crops,
            batch_size=4,
            num_workers=num_workers,
            rank=rank,
            world_size=3,
            steps_per_epoch=5,
            shuffle_buffer=8,
        )
        batches = list(loader)
        assert len(loader) == 5 and len(batches) == 5
        assert all(len(b["key"]) == 4 for b in batches)
        lengths.add(len(batches))
    assert lengths == {5}
    default = build_train_loader(only_b, root, two_crops, batch_size=4, num_workers=0, rank=2, world_size=3)
    assert len(default) == 20 // (4 * 3) == 1
    tiny = build_train_loader(only_b, root, two_crops, batch_size=64, num_workers=0, world_size=8)
    assert len(tiny) == 1  # at least one step


@pytest.mark.parametrize(
    ("weights", "expected_b"), [(None, 0.25), ({"a": 1.0, "b": 1.0}, 0.5), ({"a": 1.0, "b": 3.0}, 0.75)]
)
def test_mixture_weights_are_respected(root: Path, weights, expected_b: float) -> None:
    sources = {"a": None, "b": None} if weights is None else weights
    loader = build_train_loader(
        cfg(sources=sources), root, two_crops, batch_size=50, num_workers=0, steps_per_epoch=12, shuffle_buffer=20
    )
    counts = Counter(label for batch in loader for label in batch["source"].tolist())
    share_b = counts[1] / 600
    assert abs(share_b - expected_b) < 0.07  # binomial sd <= 0.02
    assert loader.dataset.weights["b"] == pytest.approx(expected_b)


def test_seeding_per_rank_epoch_and_workers(root: Path) -> None:
    def run(rank: int = 0, epoch: int | None = None, workers: int = 0, seed: int = 0, loader=None):
        loader = loader or build_train_loader(
            cfg(),
            root,
            two_crops,
            batch_size=4,
            num_workers=workers,
            rank=rank,
            world_size=2,
            seed=seed,
            steps_per_epoch=6,
            shuffle_buffer=10,
        )
        if epoch is not None:
            loader.dataset.set_epoch(epoch)
        return keys_of(loader)

    assert run() == run()  # reproducible
    assert run(rank=1) != run(rank=0)
    assert run(seed=1) != run(seed=0)
    assert run(epoch=1) != run(epoch=0)
    assert run(workers=2, epoch=3) == run(workers=2, epoch=3)
    with_workers = run(workers=2)
    assert len(with_workers) == 24 and len(set(with_workers[:4]) & set(with_workers[4:8])) < 4  # workers differ
    # Without set_epoch, every new iteration is a new epoch (Lightning calls iter() once per epoch).
    loader = build_train_loader(cfg(), root, two_crops, batch_size=4, num_workers=0, steps_per_epoch=6)
    first, second = keys_of(loader), keys_of(loader)
    assert first != second and loader.dataset.epoch == 1
    loader.dataset.set_epoch(0)
    assert keys_of(loader) == first
    resumed = build_train_loader(cfg(), root, two_crops, batch_size=4, num_workers=0, steps_per_epoch=6, epoch=1)
    assert keys_of(resumed) == second  # a resumed run continues with the epoch's own order


def test_fraction_is_a_deterministic_key_subsample(root: Path) -> None:
    loader = build_train_loader(
        cfg(fraction=0.5), root, two_crops, batch_size=10, num_workers=0, steps_per_epoch=20, shuffle_buffer=0
    )
    assert loader.dataset.frames_per_source == {"a": 30, "b": 10}
    keys = keys_of(loader)
    assert all(keep_frame(k.split("/", 1)[0], k.split("/", 1)[1], 0.5) for k in keys)
    all_keys = [f"v{v:02d}/{i:08d}" for v in range(2) for i in range(30)]
    kept_a = {k for k in all_keys if keep_frame("a", k, 0.5)}
    assert {k.split("/", 1)[1] for k in keys if k.startswith("a/")} == kept_a  # 200 draws cover the ~30 frames


def test_startup_reads_manifests_only(tmp_path: Path) -> None:
    write_source(tmp_path, "a", videos=3, frames_per_video=4, shard_max=2)
    shutil.rmtree(tmp_path / "a" / "shards")  # shards gone: building the loader must not notice
    loader = build_train_loader(cfg(sources={"a": None}), tmp_path, two_crops, batch_size=5, num_workers=0)
    assert len(loader) == 12 // 5 and loader.dataset.stats["shards_opened"] == 0
    with pytest.raises(RuntimeError, match="none of its 6 shards can be read"):
        next(iter(loader))
    assert loader.dataset.stats["unreadable_shards"] == 6  # each reported once


def test_missing_sources_are_listed_with_prepare_commands(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cholec = {
        "name": "cholec",
        "sources": {"cholec80": None, "heichole": None, "hsdb_chole": None},
        "fraction": 1.0,
        "allow_missing": False,
    }
    with pytest.raises(MissingSourcesError) as err:
        build_train_loader(cholec, tmp_path, two_crops, batch_size=2, num_workers=0)
    msg = str(err.value)
    for name in ("cholec80", "heichole", "hsdb_chole"):
        assert f"  - {name}: not prepared" in msg
        assert f"python -m surgenet_ssl.prepare source={name} input=" in msg
        assert str(tmp_path / name / "manifest.json") in msg
    assert "3 of 3 sources" in msg and "paths.data_root" in msg
    write_source(tmp_path, "cholec80", videos=1, frames_per_video=6)
    (tmp_path / "heichole" / ".state").mkdir(parents=True)  # an interrupted prepare
    with pytest.raises(MissingSourcesError, match=r"(?s)heichole: prepare was interrupted.*allow_missing=true"):
        build_train_loader(cholec, tmp_path, two_crops, batch_size=2, num_workers=0)
    with caplog.at_level(logging.WARNING):
        loader = build_train_loader(cholec | {"allow_missing": True}, tmp_path, two_crops, batch_size=2, num_workers=0)
    assert loader.dataset.sources == ["cholec80"] and loader.dataset.missing_sources == ["heichole", "hsdb_chole"]
    assert "missing (dataset.allow_missing=true): heichole" in caplog.text
    assert len(list(loader)) == 3


def test_bad_data_is_skipped_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = write_source(tmp_path, "bad", videos=2, frames_per_video=10, corrupt={"v00/00000003", "v00/00000007"})
    shard = src / "shards" / "v01-00000.tar"
    truncate(shard, shard.stat().st_size // 3)
    with caplog.at_level(logging.WARNING):
        loader = build_train_loader(
            cfg(sources={"bad": None}),
            tmp_path,
            two_crops,
            batch_size=4,
            num_workers=0,
            steps_per_epoch=10,
            shuffle_buffer=0,
        )
        n = sum(len(b["key"]) for b in loader)
    stats = loader.dataset.stats
    assert n == 40 and stats["samples"] == 40
    assert stats["corrupt_images"] >= 2 and stats["truncated_shards"] >= 1
    assert "corrupt image bad/v00/00000003" in caplog.text and "v01-00000.tar" in caplog.text
    assert "corrupt images so far in this worker" in caplog.text


def test_grayscale_and_cmyk_frames_reach_the_transform_as_rgb(tmp_path: Path) -> None:
    from surgenet_ssl.data.shards import ShardWriter, write_json_atomic

    w = ShardWriter(tmp_path / "modes", "shards/m", "m", 10)
    for i, mode in enumerate(["L", "CMYK", "RGB"]):
        w.write(f"m/{i:08d}", {"jpg": tiny_jpeg(100, mode=mode)})
    shards = [s.to_dict() for s in w.close()]
    write_json_atomic(
        tmp_path / "modes" / "manifest.json",
        {
            "format": "surgenet-ssl/source-shards",
            "version": 1,
            "source": "modes",
            "complete": True,
            "frames": 3,
            "shards": shards,
        },
    )
    seen = []
    loader = build_train_loader(
        {"name": "custom", "path": str(tmp_path / "modes")},
        tmp_path,
        lambda im: (seen.append(im.mode), two_crops(im))[1],
        batch_size=3,
        num_workers=0,
    )
    list(loader)
    assert set(seen) == {"RGB"} and len(seen) == 3


def test_custom_path_and_config_errors(root: Path, tmp_path: Path) -> None:
    one = build_train_loader({"name": "custom", "path": str(root / "a")}, "/unused", two_crops, 4, 0)
    assert one.dataset.sources == ["a"]
    many = build_train_loader(
        OmegaConf.create({"name": "custom", "path": str(root), "sources": None}), "/x", two_crops, 4, 0
    )
    assert many.dataset.sources == ["a", "b"]
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "clip.mp4").write_bytes(b"x")
    with pytest.raises(MissingSourcesError, match="raw videos/images.*prepare them first"):
        build_train_loader({"name": "custom", "path": str(tmp_path / "raw")}, "/x", two_crops, 4, 0)
    with pytest.raises(ValueError, match="dataset.path=DIR"):
        build_train_loader({"name": "custom", "path": "???"}, "/x", two_crops, 4, 0)
    with pytest.raises(ValueError, match="every source or to none"):
        build_train_loader(cfg(sources={"a": 2.0, "b": None}), root, two_crops, 4, 0)
    with pytest.raises(ValueError, match="fraction"):
        build_train_loader(cfg(fraction=0.0), root, two_crops, 4, 0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_stream_continues_with_exactly_the_next_batches(root: Path, num_workers: int) -> None:
    from surgenet_ssl.training.datamodule import StreamPosition

    def run(resume=None, stop_after=None):
        loader = build_train_loader(
            cfg(),
            root,
            two_crops,
            batch_size=4,
            num_workers=num_workers,
            shuffle_buffer=16,
            steps_per_epoch=7,
            resume_position=resume,
        )
        seen, position = [], StreamPosition()
        first_epoch = int(resume["epoch"]) if resume else 0
        for epoch in range(first_epoch, 2):
            loader.dataset.set_epoch(epoch)  # what the module does at each epoch start
            for batch in loader:
                position.consumed(*batch["position"].tolist())
                seen.append((batch["key"], batch["crops"][0].sum().item()))
                if stop_after is not None and len(seen) == stop_after:
                    return seen, position.state(7, num_workers)
        return seen, None

    full, _ = run()
    assert len(full) == 14
    for stop in (3, 7, 9):  # mid-epoch 0, the end of epoch 0, mid-epoch 1
        head, position = run(stop_after=stop)
        assert head == full[:stop]
        tail, _ = run(resume=position)
        assert tail == full[stop:], f"resumed after {stop} batches"

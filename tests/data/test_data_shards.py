"""Shard writing/reading, WebDataset compatibility, deterministic subsampling."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from data.data_media import tiny_jpeg, truncate
from surgenet_ssl.data.shards import ShardWriter, flat_name, iter_shard, keep_frame, sanitize_id, sha256_file


def _write(root: Path, n: int, max_frames: int = 4) -> list:
    w = ShardWriter(root, "shards/vid", "vid", max_frames)
    for i in range(n):
        w.write(f"vid/{i:08d}", {"jpg": tiny_jpeg(i), "json": json.dumps({"i": i}).encode()})
    return w.close()


def test_writer_splits_renames_and_checksums(tmp_path: Path) -> None:
    shards = _write(tmp_path, 10, max_frames=4)
    assert [s.file for s in shards] == ["shards/vid-00000.tar", "shards/vid-00001.tar", "shards/vid-00002.tar"]
    assert [s.frames for s in shards] == [4, 4, 2]
    names = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert names == sorted([Path(s.file).name for s in shards] + [f"{Path(s.file).name}.idx.json" for s in shards])
    # (each shard and its index, no temporary file)
    for s in shards:
        assert s.sha256 == sha256_file(tmp_path / s.file) and s.bytes == (tmp_path / s.file).stat().st_size
    with tarfile.open(tmp_path / shards[0].file) as t:
        assert t.getnames()[:2] == ["vid/00000000.jpg", "vid/00000000.json"]
        assert {m.mtime for m in t.getmembers()} == {0}


def test_same_frames_give_byte_identical_shards(tmp_path: Path) -> None:
    a, b = _write(tmp_path / "a", 5), _write(tmp_path / "b", 5)
    assert [s.sha256 for s in a] == [s.sha256 for s in b]


def test_abort_leaves_no_partial_shard(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, "shards/v", "v", 100)
    w.write("v/00000000", {"jpg": b"x"})
    w.abort()
    assert list((tmp_path / "shards").iterdir()) == []


def test_keys_must_not_contain_dots(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, "shards/v", "v", 10)
    with pytest.raises(ValueError, match="must not contain"):
        w.write("v/frame.1", {"jpg": b"x"})


def test_iter_shard_reads_samples_and_filters_before_reading(tmp_path: Path) -> None:
    (shard,) = _write(tmp_path, 6, max_frames=10)
    samples = list(iter_shard(tmp_path / shard.file))
    assert [k for k, _ in samples] == [f"vid/{i:08d}" for i in range(6)]
    assert json.loads(samples[3][1]["json"]) == {"i": 3} and samples[3][1]["jpg"] == tiny_jpeg(3)
    counts: dict[str, int] = {}
    even = list(iter_shard(tmp_path / shard.file, keep=lambda k: int(k[-1]) % 2 == 0, counts=counts))
    assert [k for k, _ in even] == ["vid/00000000", "vid/00000002", "vid/00000004"]
    assert counts["keys"] == 6  # skipped keys are still counted (truncation check)


def test_truncated_shard_yields_what_precedes_the_damage(tmp_path: Path) -> None:
    (shard,) = _write(tmp_path, 6, max_frames=10)
    path = tmp_path / shard.file
    with tarfile.open(path) as t:
        middle = t.getmembers()[6].offset_data + 10  # inside sample 3's jpg
    truncate(path, middle)
    got = []
    with pytest.raises((tarfile.ReadError, OSError, EOFError)):
        for key, _ in iter_shard(path):
            got.append(key)
    assert got == [f"vid/{i:08d}" for i in range(3)]
    # Cut exactly at a member boundary: tarfile ends silently; the key count reveals it.
    (shard2,) = _write(tmp_path / "b", 6, max_frames=10)
    path2 = tmp_path / "b" / shard2.file
    with tarfile.open(path2) as t:
        boundary = t.getmembers()[4].offset  # header of sample 2's jpg
    truncate(path2, boundary)
    counts: dict[str, int] = {}
    assert len(list(iter_shard(path2, counts=counts))) == 2 and counts["keys"] == 2 < shard2.frames


def test_shards_are_readable_by_webdataset(tmp_path: Path) -> None:
    import webdataset as wds

    shards = _write(tmp_path, 5, max_frames=3)
    ds = wds.WebDataset([str(tmp_path / s.file) for s in shards], shardshuffle=False)
    samples = list(ds)
    assert [s["__key__"] for s in samples] == [f"vid/{i:08d}" for i in range(5)]
    assert json.loads(samples[4]["json"]) == {"i": 4}


def test_keep_frame_is_deterministic_nested_and_close_to_the_fraction() -> None:
    keys = [f"video{v:03d}/{i:08d}" for v in range(20) for i in range(0, 5000, 25)]  # 4000 frames
    ten = {k for k in keys if keep_frame("cholec80", k, 0.1)}
    quarter = {k for k in keys if keep_frame("cholec80", k, 0.25)}
    assert ten <= quarter  # the 10% subsample is inside the 25% one
    assert abs(len(ten) / len(keys) - 0.1) < 0.015  # binomial sd = 0.0047
    assert abs(len(quarter) / len(keys) - 0.25) < 0.025
    assert ten == {k for k in keys if keep_frame("cholec80", k, 0.1)}
    assert ten != {k for k in keys if keep_frame("heichole", k, 0.1)}  # the source is part of the hash
    assert all(keep_frame("s", k, 1.0) for k in keys[:10])
    # Pinned: the same frames on every machine and version (changing the hash silently changes `small`).
    kept = [i for i in range(200) if keep_frame("cholec80", f"video01/{i * 25:08d}", 0.1)]
    assert kept == [10, 35, 42, 47, 51, 58, 61, 76, 86, 91, 114, 115, 118, 120, 125, 126, 128, 148, 149, 161, 168,
                    169, 176, 187, 194, 199]  # fmt: skip


def test_sanitize_and_flat_names() -> None:
    assert sanitize_id("case 01/video.part1") == "case_01/video_part1"
    assert sanitize_id("./a//b/") == "a/b"
    assert flat_name("a/b") == "a__b"
    long = flat_name("x" * 300)
    assert len(long) <= 120 and long != flat_name("x" * 299)

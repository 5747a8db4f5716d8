"""prepare repairs what it claims to: a rerun checks shards by sha256, re-prepares damaged inputs and removes the
stale shards of a replaced input; training names a damaged manifest.json as damaged, with the fix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from data.data_media import write_images, write_video
from surgenet_ssl.data.mixture import MissingSourcesError, resolve_mixture
from surgenet_ssl.data.preparation import PrepareSettings, prepare_source
from surgenet_ssl.data.shards import iter_shard, sha256_file


def settings() -> PrepareSettings:
    return PrepareSettings(source="testsrc", procedure="test", fps=5.0, shard_max_frames=4)


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def readable_keys(out: Path) -> list[str]:
    """Every key of every listed shard (raises on a shard that is not a readable tar)."""
    return sorted(k for s in manifest_of(out)["shards"] for k, _ in iter_shard(out / s["file"]))


def test_a_shard_replaced_by_garbage_of_the_same_size_is_prepared_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    write_video(src / "a.mp4", frames=50)  # 10 frames: 3 shards of <= 4
    write_video(src / "b.mp4", frames=30)
    write_images(src / "frames", 5)
    first = prepare_source(src, out, settings(), workers=0, progress=False)
    keys = readable_keys(out)
    assert first.frames_total == len(keys) == 10 + 6 + 5
    victim = out / "shards" / "a-00001.tar"
    victim.write_bytes(os.urandom(victim.stat().st_size))  # same size: the old check trusted it
    untouched = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir() if not p.name.startswith("a-")}

    trusting = prepare_source(src, out, settings(), workers=0, progress=False, verify=False)  # sizes only: fast
    assert trusting.units_done_before == 3 and not trusting.units_damaged
    with caplog.at_level("WARNING"):
        second = prepare_source(src, out, settings(), workers=0, progress=False)
    assert second.units_done_before == 2 and second.units_done_now == 1
    assert second.units_damaged == ["a.mp4: shards/a-00001.tar (sha256 differs from the recorded one)"]
    assert "1 finished inputs have shards that fail their sha256 check" in caplog.text and "a-00001" in caplog.text
    assert readable_keys(out) == keys and second.frames_total == first.frames_total
    m = manifest_of(out)
    assert all(sha256_file(out / s["file"]) == s["sha256"] for s in m["shards"])
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir() if not p.name.startswith("a-")} == (
        untouched
    )  # the sound inputs are not rewritten
    # a missing shard is repaired the same way
    (out / "shards" / "b-00000.tar").unlink()
    third = prepare_source(src, out, settings(), workers=0, progress=False)
    assert third.units_damaged and third.units_damaged[0].startswith("b.mp4: shards/b-00000.tar")
    assert readable_keys(out) == keys


def test_a_replaced_input_leaves_no_stale_shards(tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    write_video(src / "clip.mp4", frames=50)  # 10 frames: clip-00000..00002
    write_video(src / "clip-00001.mp4", frames=20)  # a video whose name looks like a shard number of "clip"
    prepare_source(src, out, settings(), workers=0, progress=False)
    shards = sorted(p.name for p in (out / "shards").glob("*.tar"))
    assert shards == ["clip-00000.tar", "clip-00001-00000.tar", "clip-00001.tar", "clip-00002.tar"]
    write_video(src / "clip.mp4", frames=15)  # a new recording under the same name: 3 frames, one shard
    s = prepare_source(src, out, settings(), workers=0, progress=False)
    assert s.units_done_now == 1 and s.units_done_before == 1
    assert sorted(p.name for p in (out / "shards").iterdir()) == [  # each shard with its index, nothing stale
        "clip-00000.tar",
        "clip-00000.tar.idx.json",
        "clip-00001-00000.tar",
        "clip-00001-00000.tar.idx.json",
    ]
    assert sorted(s["file"] for s in manifest_of(out)["shards"]) == [
        "shards/clip-00000.tar",
        "shards/clip-00001-00000.tar",
    ]
    assert len(readable_keys(out)) == 3 + 4


def test_damaged_shards_of_another_input_location_are_named_and_repaired_with_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, second, out = tmp_path / "set1", tmp_path / "set2", tmp_path / "out"
    write_images(first / "v1", 3, names="f{i}.png")
    write_images(second / "v2", 2, names="f{i}.png")
    prepare_source(first, out, settings(), workers=0, progress=False)
    prepare_source(second, out, settings(), workers=0, progress=False)
    shard = out / "shards" / "v1-00000.tar"
    shard.write_bytes(bytes(shard.stat().st_size))
    with caplog.at_level("WARNING"):
        s = prepare_source(second, out, settings(), workers=0, progress=False)
    assert s.frames_total == 2 and s.units_kept == 0  # not listed: it would fail at training
    assert "1 inputs prepared earlier from other locations have damaged or missing shards" in caplog.text
    assert str(first / "v1") in caplog.text or str(first.resolve() / "v1") in caplog.text
    s = prepare_source([first, second], out, settings(), workers=0, progress=False)
    assert s.units_damaged and s.frames_total == 5 and len(readable_keys(out)) == 5


@pytest.mark.parametrize("damage", ["half", "empty"])
def test_training_calls_a_damaged_manifest_damaged(tmp_path: Path, damage: str) -> None:
    src, out = tmp_path / "in", tmp_path / "prepared" / "testsrc"
    write_images(src / "v1", 3, names="f{i}.png")
    prepare_source(src, out, settings(), workers=0, progress=False)
    text = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text(text[: len(text) // 2] if damage == "half" else "")
    for cfg in (
        {"name": "custom", "path": str(out)},  # the source itself
        {"name": "custom", "sources": {"testsrc": None}},  # a named source under the data root
    ):
        with pytest.raises(MissingSourcesError) as err:
            resolve_mixture(cfg, tmp_path / "prepared")
        msg = str(err.value)
        assert str(out / "manifest.json") in msg and "damaged" in msg and "No prepared source" not in msg
        assert "rerun `python -m surgenet_ssl.prepare`" in msg
    # the fix the message gives works: the rerun rebuilds the manifest, nothing prepared again
    again = prepare_source(src, out, settings(), workers=0, progress=False)
    assert again.units_done_before == 1 and again.units_done_now == 0
    assert [s.name for s in resolve_mixture({"name": "custom", "path": str(out)}, "/unused").sources] == ["testsrc"]

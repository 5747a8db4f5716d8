"""Leakage guard: exclude_videos in prepare and in a mixture, the shipped Cholec80 / CholecSeg8k lists, the model
card line; on a tiny Cholec80 replica (videos/videoNN.mp4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.data_media import write_video
from surgenet_ssl.data.mixture import resolve_mixture
from surgenet_ssl.data.preparation import PrepareSettings, prepare_source
from surgenet_ssl.data.shards import iter_shard
from surgenet_ssl.data.video_exclusion import load_video_exclusion, shipped_lists
from surgenet_ssl.training.teacher_export import _exclusion_line

VIDEOS = ["video01", "video09", "video33", "video41", "video43", "video80"]


@pytest.fixture(scope="module")
def cholec80(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cholec80")
    for v in VIDEOS:
        write_video(root / "videos" / f"{v}.mp4", frames=10, fps=25)  # 2 frames each at fps=5
    (root / "phase_annotations").mkdir()
    return root


def settings() -> PrepareSettings:
    return PrepareSettings(source="cholec80", procedure="test", fps=5.0, sampling="surgenet")


def videos_in(out: Path) -> set[str]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {json.loads(s["json"])["video"] for sh in manifest["shards"] for _, s in iter_shard(out / sh["file"])}


def test_shipped_lists_are_the_standard_ones() -> None:
    lists = shipped_lists()
    assert set(lists) == {"cholec80_train", "cholec80_train32", "cholec80_test", "cholec80_val", "cholecseg8k"}
    assert load_video_exclusion("cholec80_train").ids == {f"video{i:02d}" for i in range(1, 41)}
    assert load_video_exclusion("cholec80_train32").ids == {f"video{i:02d}" for i in range(1, 33)}
    assert load_video_exclusion("cholec80_test").ids == {f"video{i:02d}" for i in range(41, 81)}
    assert load_video_exclusion("cholec80_val").ids == {f"video{i:02d}" for i in range(33, 41)}
    seg = load_video_exclusion("cholecseg8k").ids
    assert len(seg) == 17 and {"video01", "video43", "video55"} <= seg and "video02" not in seg
    for path in lists.values():
        assert "# Source:" in path.read_text()  # every list says where it comes from


def test_items_are_lists_files_or_ids_and_a_missing_file_is_named(tmp_path: Path) -> None:
    listed = tmp_path / "my_test_videos.txt"
    listed.write_text("# our hospital's test cases\nvideo07\n\ncase 12  # a space becomes _ as in the keys\n")
    ex = load_video_exclusion(["cholec80_val", str(listed), "video99"])
    assert ex.ids == {f"video{i:02d}" for i in range(33, 41)} | {"video07", "case_12", "video99"}
    assert ex.origins == ("cholec80_val", str(listed), "1 ids given inline")
    assert ex.match("cholec80/videos/video33") == "video33" and ex.match("videos/video3") is None
    assert ex.match("video99") == "video99" and ex.match("a/video990") is None
    assert not load_video_exclusion(None) and not load_video_exclusion([])
    with pytest.raises(ValueError, match=r"exclude_videos: .*nope/test\.txt is not a file.*cholec80_test"):
        load_video_exclusion(["cholec80_test", str(tmp_path / "nope" / "test.txt")])


def test_prepare_leaves_excluded_videos_out_and_records_them(
    cholec80: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "cholec80"
    with caplog.at_level("INFO"):
        s = prepare_source(
            cholec80, out, settings(), workers=0, progress=False, exclude_videos=load_video_exclusion("cholec80_test")
        )
    assert s.frames_total == 2 * 3 and videos_in(out) == {"videos/video01", "videos/video09", "videos/video33"}
    recorded = json.loads((out / "manifest.json").read_text())["excluded_videos"]
    assert recorded["origins"] == ["cholec80_test"] and len(recorded["ids"]) == 40
    assert recorded["videos"] == ["videos/video41", "videos/video43", "videos/video80"]
    assert recorded["unmatched"] == 37  # the replica has 3 of the 40 test videos
    assert "exclude_videos (40 video ids from cholec80_test) leaves out 3 videos" in caplog.text
    assert "37 listed ids match no video here" in caplog.text
    # a rerun that also excludes CholecSeg8k's videos drops the already prepared ones from the manifest
    both = load_video_exclusion(["cholec80_test", "cholecseg8k"])
    caplog.clear()
    with caplog.at_level("WARNING"):
        again = prepare_source(cholec80, out, settings(), workers=0, progress=False, exclude_videos=both)
    assert again.frames_total == 2 and videos_in(out) == {"videos/video33"}
    assert "not in this run's inputs any more" in caplog.text and "video01" in caplog.text


def test_a_mixture_leaves_excluded_videos_out(cholec80: Path, tmp_path: Path) -> None:
    root = tmp_path / "prepared"
    prepare_source(cholec80, root / "cholec80", settings(), workers=0, progress=False)
    full = resolve_mixture({"name": "custom", "sources": {"cholec80": None}}, root).sources[0]
    assert full.frames == 12 and not full.excluded_videos
    cfg = {"name": "custom", "sources": {"cholec80": None}, "exclude_videos": ["cholec80_test", "video09"]}
    spec = resolve_mixture(cfg, root).sources[0]
    assert spec.excluded_videos == ["videos/video09", "videos/video41", "videos/video43", "videos/video80"]
    assert spec.frames == spec.expected_frames == 4
    assert {sh["video"] for sh in spec.shards} == {"videos/video01", "videos/video33"}
    with pytest.raises(ValueError, match="is not a file"):
        resolve_mixture(cfg | {"exclude_videos": "missing/list.txt"}, root)


def test_the_model_card_says_what_was_excluded() -> None:
    line = _exclusion_line({"dataset": {"exclude_videos": ["cholecseg8k"]}})
    assert "17 video ids from cholecseg8k: video01, video09" in line and "video55" in line
    assert "none at training time" in _exclusion_line({"dataset": {"name": "cholec"}})

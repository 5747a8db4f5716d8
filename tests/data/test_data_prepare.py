"""prepare: mixed inputs, bad inputs counted, stable keys, resumability after a kill, parallel = serial, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.data_media import VIDEO_KINDS, tar_member_names, write_images, write_video
from surgenet_ssl.data.preparation import PrepareError, PrepareSettings, discover_units, prepare_source
from surgenet_ssl.data.shards import iter_shard, sha256_file

REPO = Path(__file__).resolve().parents[2]
FRAMES_PER_VIDEO = 10  # 50 frames at 25 fps sampled at fps=5


def make_input(root: Path, reverse: bool = False) -> Path:
    """5 good videos (one per codec/container), 1 nested video, 2 image folders, and bad inputs."""
    jobs = [(root / name, codec, pix, w, h) for name, codec, pix, w, h in VIDEO_KINDS]
    jobs.append((root / "case 2" / "clip.v1.mp4", "libx264", "yuv420p", 64, 48))
    for path, codec, pix, w, h in reversed(jobs) if reverse else jobs:  # creation order must not matter
        write_video(path, codec, pix, w, h, frames=50, fps=25)
    write_images(root / "frames" / "op1", 7, names="img_{i}.png")
    write_images(root / "frames" / "op2", 3, size=(33, 21), names="{i}.jpg")
    (root / "frames" / "op1" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "empty.mp4").write_bytes(b"")
    (root / "junk.avi").write_bytes(os.urandom(3000))
    (root / "notes.txt").write_text("ignored")
    return root


GOOD_VIDEOS = len(VIDEO_KINDS) + 1
GOOD_FRAMES = GOOD_VIDEOS * FRAMES_PER_VIDEO + 7 + 3


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_input(tmp_path_factory.mktemp("media"))


def settings(**kw) -> PrepareSettings:
    return PrepareSettings(**({"source": "testsrc", "procedure": "test procedure", "fps": 5.0} | kw))


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_prepare_mixed_folder_counts_everything(media: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    s = prepare_source(media, out, settings(), workers=0, progress=False)
    assert s.units_total == GOOD_VIDEOS + 2 + 2 and s.units_done_now == GOOD_VIDEOS + 2
    assert sorted(f["input"] for f in s.units_failed) == ["empty.mp4", "junk.avi"]
    assert s.images_corrupt == 1 and s.files_ignored == {".txt": 1}
    m = manifest_of(out)
    assert m["complete"] and m["frames"] == GOOD_FRAMES == s.frames_total
    assert m["skipped"]["corrupt_images"] == 1 and len(m["skipped"]["inputs"]) == 2
    assert m["settings"]["fps"] == 5.0 and m["settings"]["resize_short"] == 320
    for shard in m["shards"]:
        assert sha256_file(out / shard["file"]) == shard["sha256"]
    keys = {}
    for shard in m["shards"]:
        for key, sample in iter_shard(out / shard["file"]):
            keys[key] = json.loads(sample["json"])
    assert len(keys) == GOOD_FRAMES
    meta = keys["case_2/clip_v1/00000045"]  # stable key: <video path>/<frame index>
    assert meta["source"] == "testsrc" and meta["procedure"] == "test procedure" and meta["video"] == "case_2/clip_v1"
    assert (
        meta["frame_index"] == 45 and meta["timestamp"] == pytest.approx(1.8) and meta["input"] == "case 2/clip.v1.mp4"
    )
    assert (meta["width"], meta["height"]) == (64, 48)
    assert keys["ffv1_odd/00000000"]["orig_width"] == 63
    assert "frames/op1/img_6" in keys and "frames/op2/2" in keys and keys["frames/op1/img_6"]["timestamp"] is None
    assert not any("broken" in k for k in keys)


def test_keys_and_bytes_do_not_depend_on_listing_order(tmp_path: Path, media: Path) -> None:
    other = make_input(tmp_path / "media_reversed", reverse=True)
    a = prepare_source(media, tmp_path / "a", settings(), workers=0, progress=False)
    b = prepare_source(other, tmp_path / "b", settings(), workers=0, progress=False)
    assert a.frames_total == b.frames_total
    sha = lambda out: {s["file"]: s["sha256"] for s in manifest_of(out)["shards"]}  # noqa: E731
    videos_a = {f: h for f, h in sha(tmp_path / "a").items() if "frames" not in f}
    videos_b = {f: h for f, h in sha(tmp_path / "b").items() if "frames" not in f}
    assert videos_a == videos_b  # same names, same bytes
    assert [u.id for u in discover_units(media)] == [u.id for u in discover_units(other)]


def test_interrupted_run_never_lists_partial_shards_and_rerun_resumes(media: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = prepare_source(media, out, settings(), workers=0, progress=False, max_units=3)  # "killed" after 3
    m = manifest_of(out)
    assert not m["complete"] and m["pending"] == first.units_total - 3
    listed = {s["file"] for s in m["shards"]}
    assert len(listed) == first.units_done_now and m["frames"] == first.frames_written_now
    # What a kill leaves behind: a half-written temporary shard, and a renamed shard whose video has no record.
    (out / "shards" / ".vp9-00000.tar.999.tmp").write_bytes(b"partial")
    orphan = out / "shards" / "vp9-00000.tar"
    orphan.write_bytes(b"not finished")
    assert "shards/vp9-00000.tar" not in listed
    stamps = {f: (out / f).stat().st_mtime_ns for f in listed}

    second = prepare_source(media, out, settings(), workers=0, progress=False)
    done_first = first.units_done_now
    assert done_first == 2 and len(first.units_failed) == 1  # case_2/clip_v1, empty (failed), ffv1_odd
    assert second.units_done_before == done_first and second.units_done_now == GOOD_VIDEOS + 2 - done_first
    assert {f: (out / f).stat().st_mtime_ns for f in listed} == stamps  # finished work is not rewritten
    assert not list((out / "shards").glob(".*.tmp"))
    m2 = manifest_of(out)
    assert m2["complete"] and m2["frames"] == GOOD_FRAMES
    assert tar_member_names(orphan)[0] == "vp9/00000000.jpg"  # redone properly
    one_shot = tmp_path / "one_shot"
    prepare_source(media, one_shot, settings(), workers=0, progress=False)
    assert sorted((s["file"], s["sha256"]) for s in m2["shards"]) == sorted(
        (s["file"], s["sha256"]) for s in manifest_of(one_shot)["shards"]
    )
    third = prepare_source(media, out, settings(), workers=0, progress=False)
    assert third.units_done_now == 0 and third.frames_written_now == 0 and len(third.units_failed) == 2


def test_changed_settings_are_refused_unless_overwrite(media: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_source(media / "frames", out, settings(), workers=0, progress=False)
    with pytest.raises(PrepareError, match=r"other settings \(resize_short: 320 -> 128\).*overwrite=true"):
        prepare_source(media / "frames", out, settings(resize_short=128), workers=0, progress=False)
    s = prepare_source(media / "frames", out, settings(resize_short=16), workers=0, progress=False, overwrite=True)
    assert s.units_done_now == 2
    sizes = [
        (json.loads(sample["json"])["width"], json.loads(sample["json"])["height"])
        for shard in manifest_of(out)["shards"]
        for _, sample in iter_shard(out / shard["file"])
    ]
    assert len(sizes) == 10 and {min(wh) for wh in sizes} == {16}


def test_image_stride_and_output_inside_input(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_images(src / "seq", 10, names="f{i}.png")
    out = src / "prepared"  # inside the input: must not be read back as input on rerun
    s = prepare_source(src, out, settings(image_stride=3), workers=0, progress=False)
    assert s.frames_total == 4  # images 0, 3, 6, 9 in natural order (f10 would sort after f9)
    s2 = prepare_source(src, out, settings(image_stride=3), workers=0, progress=False)
    assert s2.units_total == 1 and s2.units_done_before == 1


def test_bad_input_paths_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match="does not exist"):
        prepare_source(tmp_path / "nope", tmp_path / "o", settings(), workers=0, progress=False)
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("x")
    with pytest.raises(PrepareError, match="No videos"):
        prepare_source(tmp_path / "txt", tmp_path / "o", settings(), workers=0, progress=False)


def test_parallel_workers_give_the_same_shards(media: Path, tmp_path: Path) -> None:
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    prepare_source(media, serial, settings(), workers=0, progress=False)
    s = prepare_source(media, parallel, settings(), workers=2, progress=False)
    assert s.frames_total == GOOD_FRAMES and len(s.units_failed) == 2 and s.images_corrupt == 1
    assert sorted((x["file"], x["sha256"]) for x in manifest_of(serial)["shards"]) == sorted(
        (x["file"], x["sha256"]) for x in manifest_of(parallel)["shards"]
    )


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "surgenet_ssl.prepare", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_prepares_into_data_root_and_reports_errors(tmp_path: Path) -> None:
    write_video(tmp_path / "in" / "a.mp4", frames=50, fps=25)
    r = _cli(
        "source=HeiChole",
        f"input={tmp_path / 'in'}",
        f"paths.data_root={tmp_path / 'root'}",
        "progress=false",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    assert r.stdout.strip().splitlines()[-1].startswith("prepared 2 frames of source heichole")  # fps=1 default
    m = manifest_of(tmp_path / "root" / "heichole")
    assert m["source"] == "heichole" and m["procedure"] == "laparoscopic cholecystectomy"
    assert (tmp_path / "root" / "heichole" / "prepare.log").is_file()
    assert not (tmp_path / ".hydra").exists()
    bad = _cli("source=x", cwd=tmp_path)
    assert bad.returncode == 2 and "input=DIR is required" in bad.stdout + bad.stderr
    (tmp_path / "only_empty").mkdir()
    (tmp_path / "only_empty" / "empty.mp4").write_bytes(b"")
    none = _cli(
        "source=y",
        f"input={tmp_path / 'only_empty'}",
        f"paths.data_root={tmp_path / 'root'}",
        "progress=false",
        cwd=tmp_path,
    )
    assert none.returncode == 1 and "no frame could be prepared" in none.stdout + none.stderr


def test_a_crashing_worker_skips_only_its_video(media: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SURGENET_SSL_FAULT_CRASH_ON", "mjpeg.avi")  # that worker process dies (like a segfault)
    s = prepare_source(media, tmp_path / "out", settings(), workers=2, progress=False)
    reasons = {f["input"]: f["reason"] for f in s.units_failed}
    assert set(reasons) == {"empty.mp4", "junk.avi", "mjpeg.avi"} and "crashed" in reasons["mjpeg.avi"]
    assert s.frames_total == GOOD_FRAMES - FRAMES_PER_VIDEO


def test_big_image_folders_are_split_into_parallel_parts_with_the_same_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import surgenet_ssl.data.preparation as P

    write_images(tmp_path / "src" / "seq", 7, names="f{i}.png")
    whole = prepare_source(tmp_path / "src", tmp_path / "whole", settings(image_stride=2), workers=0, progress=False)
    monkeypatch.setattr(P, "IMAGES_PER_UNIT", 3)
    assert [u.id for u in discover_units(tmp_path / "src")] == ["seq@part0000", "seq@part0001", "seq@part0002"]
    parts = prepare_source(tmp_path / "src", tmp_path / "parts", settings(image_stride=2), workers=0, progress=False)
    assert whole.frames_total == parts.frames_total == 4  # f0 f2 f4 f6: the stride counts across parts

    def frames(out: Path) -> dict:
        return {k: json.loads(s["json"]) for sh in manifest_of(out)["shards"] for k, s in iter_shard(out / sh["file"])}

    a, b = frames(tmp_path / "whole"), frames(tmp_path / "parts")
    assert a == b and sorted(a) == ["seq/f0", "seq/f2", "seq/f4", "seq/f6"] and a["seq/f4"]["frame_index"] == 4


def _keys(out: Path) -> set[str]:
    return {k for sh in manifest_of(out)["shards"] for k, _ in iter_shard(out / sh["file"])}


def test_inputs_with_one_flat_name_keep_all_their_frames(tmp_path: Path) -> None:
    """Folders ``a/b`` and ``a__b`` (and ``x_/y`` vs ``x/_y``) flatten alike: each keeps its own shards and record."""
    src = tmp_path / "src"
    write_images(src / "a" / "b", 2, names="f{i}.png")
    write_images(src / "a__b", 3, names="f{i}.png")
    write_images(src / "x_" / "y", 1, names="f{i}.png")
    write_images(src / "x" / "_y", 4, names="f{i}.png")
    out = tmp_path / "out"
    s = prepare_source(src, out, settings(), workers=0, progress=False)
    assert s.frames_total == 10 and s.units_done_now == 4
    m = manifest_of(out)
    files = [sh["file"] for sh in m["shards"]]
    assert len(set(files)) == len(files) == 4
    for sh in m["shards"]:
        assert sha256_file(out / sh["file"]) == sh["sha256"]
    assert len(list((out / ".state").glob("*.json"))) == 4 + 1  # + settings.json
    assert len(_keys(out)) == 10 and {"a/b/f1", "a__b/f2", "x_/y/f0", "x/_y/f3"} <= _keys(out)
    again = prepare_source(src, out, settings(), workers=0, progress=False)
    assert again.units_done_before == 4 and again.units_done_now == 0 and again.frames_total == 10


def test_a_second_input_adds_to_the_source_and_keeps_the_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, second, out = tmp_path / "set1", tmp_path / "set2", tmp_path / "out"
    write_images(first / "v1", 3, names="f{i}.png")
    write_images(second / "v2", 2, names="f{i}.png")
    prepare_source(first, out, settings(), workers=0, progress=False)
    with caplog.at_level("INFO"):
        s = prepare_source(second, out, settings(), workers=0, progress=False)
    assert s.frames_total == 5 and s.units_kept == 1 and s.frames_kept == 3
    assert "keeping 1 inputs (3 frames) prepared earlier from" in caplog.text and str(first.resolve()) in caplog.text
    m = manifest_of(out)
    assert m["frames"] == 5 and m["inputs"] == 2 and m["complete"]
    assert _keys(out) == {"v1/f0", "v1/f1", "v1/f2", "v2/f0", "v2/f1"}
    # Both at once (a list of inputs) is the same source; rerunning either one alone loses nothing.
    both = prepare_source([first, second], tmp_path / "both", settings(), workers=0, progress=False)
    assert both.frames_total == 5 and _keys(tmp_path / "both") == _keys(out)
    assert prepare_source(first, out, settings(), workers=0, progress=False).frames_total == 5
    # An input deleted from a location this run reads is left out, with a warning that names it.
    import shutil

    shutil.rmtree(second / "v2")
    write_images(second / "v3", 1, names="f{i}.png")
    caplog.clear()
    with caplog.at_level("WARNING"):
        s = prepare_source(second, out, settings(), workers=0, progress=False)
    assert s.frames_total == 4 and "1 inputs prepared earlier are not in this run's inputs" in caplog.text
    assert "v2" in caplog.text


def test_two_inputs_with_the_same_video_are_refused_before_writing_or_prefixed(tmp_path: Path) -> None:
    first, second, out = tmp_path / "set1", tmp_path / "set2", tmp_path / "out"
    write_images(first / "obj", 3, names="f{i}.png")
    write_images(second / "obj", 2, names="g{i}.png")
    with pytest.raises(PrepareError, match=r"would both be video 'obj'.*input_prefix=true"):
        prepare_source([first, second], out, settings(), workers=0, progress=False)
    assert not out.exists()
    prepare_source(first, out, settings(), workers=0, progress=False)
    before = manifest_of(out)
    with pytest.raises(PrepareError, match=r"would replace video 'obj' prepared earlier from .*set1"):
        prepare_source(second, out, settings(), workers=0, progress=False)
    assert manifest_of(out) == before
    s = prepare_source([first, second], tmp_path / "pre", settings(), workers=0, progress=False, input_prefix=True)
    assert s.frames_total == 5 and {k.split("/")[0] for k in _keys(tmp_path / "pre")} == {"set1", "set2"}

"""Curation (issue 25 items 1-3): each threshold's default justified on generated frames of each kind, the curate
pipeline (view, CSV, report, contact sheets, cached scores, opt-out lists, unreadable frames, damaged shards, a user
classifier), dataset.curated=true in the loader, and the model card."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.curation_media import (
    black_frames,
    blurred,
    endoscopic_frames,
    endoscopic_videos,
    flat_frames,
    jpeg_roundtrip,
    near_duplicate,
    operating_room_frames,
    smoke,
    title_cards,
    write_frames_source,
)
from data.data_media import truncate
from surgenet_ssl.data.curation import (
    CurationError,
    CurationSettings,
    FrameClassifier,
    curate_source,
    read_curated_view,
)
from surgenet_ssl.data.frame_scores import hamming, score_frame
from surgenet_ssl.data.loader import build_train_loader
from surgenet_ssl.data.mixture import resolve_mixture
from surgenet_ssl.data.video_exclusion import load_frame_exclusion, load_video_exclusion
from surgenet_ssl.runtime.io_utils import sha256_file
from surgenet_ssl.training.teacher_export import _curation_lines

DEFAULTS = CurationSettings()


@pytest.fixture(scope="module")
def endoscopic() -> list[np.ndarray]:
    """30 frames: the demo's three procedures (circular, wide and no vignette; camera looks), stored as JPEG."""
    return [jpeg_roundtrip(f) for f in endoscopic_frames()]


def scores(frames: list[np.ndarray]):
    return [score_frame(jpeg_roundtrip(f)) for f in frames]


# ------------------------------------------------------------------------------ each default, justified on examples
def test_dark_default_drops_black_frames_and_fades_not_vignetted_views(endoscopic: list[np.ndarray]) -> None:
    limit = DEFAULTS.dark.max_fraction
    dark = scores(black_frames(np.random.default_rng(0)) + title_cards()[:2])
    assert all(s.dark_fraction > limit for s in dark), [s.dark_fraction for s in dark]
    surgical = [score_frame(f).dark_fraction for f in endoscopic]
    assert max(surgical) < limit - 0.4  # a circular vignette darkens a third of the frame, far from the limit


def test_low_information_default_drops_title_cards_and_flat_screens_not_surgery_or_rooms(
    endoscopic: list[np.ndarray],
) -> None:
    limit = DEFAULTS.low_information.min_entropy
    low = scores(flat_frames() + title_cards()[2:])  # a flat colour; white text on a flat blue card
    assert all(s.entropy < limit - 2 for s in low), [s.entropy for s in low]
    rich = [score_frame(f).entropy for f in endoscopic] + [
        s.entropy for s in scores(operating_room_frames(np.random.default_rng(1)))
    ]
    assert min(rich) > limit + 1  # informative frames (also rooms: they are dropped as out of body, not here)


def test_blur_default_drops_blurred_and_smoky_frames_not_sharp_ones(endoscopic: list[np.ndarray]) -> None:
    limit = DEFAULTS.blur.min_sharpness
    sharp = [score_frame(f).sharpness for f in endoscopic]
    soft = [s.sharpness for s in scores([blurred(f, 2.0) for f in endoscopic] + [smoke(f) for f in endoscopic])]
    assert min(sharp) > limit and max(soft) < limit, (min(sharp), max(soft))
    assert min(sharp) / limit > 1.25 and limit / max(soft) > 1.25  # the default sits between them with room


def test_out_of_body_default_drops_operating_room_views_not_any_endoscopic_look(endoscopic: list[np.ndarray]) -> None:
    limit = DEFAULTS.out_of_body.threshold
    room = [1 - s.in_body for s in scores(operating_room_frames(np.random.default_rng(2), n=12))]
    inside = [1 - score_frame(f).in_body for f in endoscopic]  # circular / wide vignettes, full-frame robotic view
    assert min(room) > limit + 0.15 and max(inside) < limit - 0.15, (min(room), max(inside))


def test_duplicate_default_joins_noisy_copies_and_separates_frames_a_second_apart() -> None:
    limit = DEFAULTS.duplicates.max_hamming
    rng = np.random.default_rng(3)
    frames = endoscopic_frames()
    copies = [hamming(score_frame(jpeg_roundtrip(f)).phash, score_frame(near_duplicate(f, rng)).phash) for f in frames]
    assert max(copies) <= limit - 2, copies
    apart = [
        hamming(score_frame(jpeg_roundtrip(a)).phash, score_frame(jpeg_roundtrip(b)).phash)
        for video in endoscopic_videos().values()
        for a, b in zip(video, video[1:], strict=False)
    ]
    assert sum(d > limit for d in apart) >= 0.9 * len(apart), apart  # a slow pan may look static for a second


# ---------------------------------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """case01: 5 good frames with a near-duplicate, a black frame, an operating-room view, a blurred frame and a
    title card; case02: 3 good frames and a corrupt one; case03: 2 good frames (a test video)."""
    rng = np.random.default_rng(4)
    videos = endoscopic_videos()
    chole, prost = videos["cholecystectomy"], videos["prostatectomy"]
    room = operating_room_frames(rng, n=1)[0]
    case01 = [chole[0], chole[2], near_duplicate(chole[2], rng), chole[4], black_frames(rng)[0], room]
    case01 += [blurred(chole[6], 3.0), title_cards()[2], chole[8]]
    case02 = [prost[0], prost[3], b"\xff\xd8 not a jpeg", prost[6]]
    case03 = [prost[8], prost[9]]
    out = write_frames_source(
        tmp_path_factory.mktemp("curation"), "src", {"case01": case01, "case02": case02, "case03": case03}
    )
    expected = {
        "case01/00000002": "duplicate",
        "case01/00000004": "dark",
        "case01/00000005": "out_of_body",
        "case01/00000006": "blurry",
        "case01/00000007": "low_information",
        "case01/00000008": "excluded_frame",
        "case02/00000002": "unreadable",
        "case03/00000000": "excluded_video",
        "case03/00000001": "excluded_video",
    }
    return out, expected


def test_curate_writes_view_csv_report_and_sheets_and_changes_no_shard(source: tuple[Path, dict[str, str]]) -> None:
    out, expected = source
    shards = sorted(out.glob("shards/*.tar"))
    before = {p: sha256_file(p) for p in shards}
    summary = curate_source(
        out,
        DEFAULTS,
        videos=load_video_exclusion(["case03"]),
        frames=load_frame_exclusion(["case01/8"]),  # an opt-out of one frame, its index without padding
    )
    assert {p: sha256_file(p) for p in shards} == before and sorted(out.glob("shards/*.tar")) == shards  # no deletion
    cur = out / "curation"
    rows = list(csv.DictReader(open(cur / "frames.csv", encoding="utf-8")))
    assert len(rows) == 15 and summary.frames == 15 and summary.kept == 15 - len(expected)
    assert {r["key"]: r["reason"] for r in rows if r["reason"]} == expected
    dup = next(r for r in rows if r["key"] == "case01/00000002")
    assert dup["duplicate_of"] == "case01/00000001" and int(dup["hamming"]) <= DEFAULTS.duplicates.max_hamming
    assert "not a jpeg" not in rows[11]["error"] and rows[11]["error"]  # the decoder's message, counted
    report = json.loads((cur / "report.json").read_text())
    assert {r: n for r, n in report["dropped"].items() if n} == {
        "unreadable": 1,
        "excluded_video": 2,
        "excluded_frame": 1,
        "dark": 1,
        "low_information": 1,
        "blurry": 1,
        "out_of_body": 1,
        "duplicate": 1,
    }
    assert report["exclusions"]["videos"]["matched"] == ["case03"] and report["exclusions"]["frames"]["matched"] == 1
    for reason in ("dark", "out_of_body", "duplicate", "unreadable"):
        sheet = Image.open(cur / f"dropped_{reason}.png")
        assert sheet.width == 8 * 160 and sheet.height > 100
    assert not (cur / "dropped_kept.png").exists() and report["contact_sheets"]["dark"] == "dropped_dark.png"
    manifest = json.loads((out / "manifest.json").read_text())
    view = read_curated_view(out, manifest["shards"])
    kept = {f"{sh['file']}:{o}" for sh in manifest["shards"] for o in view["kept"][sh["file"]].tolist()}
    assert view["frames"] == 6 and "shards/case01-00000.tar:0" in kept and "shards/case01-00000.tar:2" not in kept
    assert not list(cur.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_new_thresholds_reuse_the_scores_and_a_changed_shard_is_rescored(
    source: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    out, _ = source
    curate_source(out, DEFAULTS)
    strict = CurationSettings.from_dict({"duplicates": {"max_hamming": -1}, "blur": {"min_sharpness": 0.0}})
    summary = curate_source(out, strict)
    assert summary.rescored_shards == 0 and summary.counts["duplicate"] == summary.counts["blurry"] == 0
    with pytest.raises(ValueError, match=r"curate\.blur\.min_sharpnes"):
        CurationSettings.from_dict({"blur": {"min_sharpnes": 3}})


def test_a_damaged_shard_counts_its_lost_frames_as_unreadable(tmp_path: Path) -> None:
    frames = [jpeg_roundtrip(f) for f in endoscopic_videos()["cholecystectomy"][:6]]
    out = write_frames_source(tmp_path, "cut", {"v": frames})
    shard = out / "shards" / "v-00000.tar"
    truncate(shard, shard.stat().st_size // 2)
    summary = curate_source(out, DEFAULTS)
    assert summary.damaged_shards and summary.counts["unreadable"] >= 3 and summary.kept <= 3
    assert summary.kept + sum(summary.counts.values()) == 6


# ------------------------------------------------------------------------------------------------------- classifier
def test_a_missing_classifier_file_is_a_clear_error(tmp_path: Path) -> None:
    settings = CurationSettings.from_dict(
        {"out_of_body": {"classifier": {"model": "test_resnet", "weights": str(tmp_path / "ob.pth")}}}
    )
    with pytest.raises(CurationError, match=r"weights=.*ob\.pth' is not a file"):
        FrameClassifier(settings.out_of_body.classifier)


def test_a_user_classifier_decides_out_of_body_through_the_weight_loader(
    source: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    import timm

    model = timm.create_model("test_resnet", num_classes=2, pretrained=False)
    with torch.no_grad():  # a classifier that calls every frame out of body
        model.get_classifier().weight.zero_()
        model.get_classifier().bias.copy_(torch.tensor([-5.0, 5.0]))
    path = tmp_path / "ob.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    cfg = {"out_of_body": {"classifier": {"model": "test_resnet", "weights": str(path), "threshold": 0.9}}}
    settings = CurationSettings.from_dict(cfg)
    out, _ = source
    summary = curate_source(out, settings, classifier=FrameClassifier(settings.out_of_body.classifier))
    assert summary.kept == 0 and summary.rescored_shards == 3  # the classifier's output is part of the scores
    rows = list(csv.DictReader(open(out / "curation" / "frames.csv", encoding="utf-8")))
    assert all(float(r["classifier"]) > 0.99 for r in rows if not r["error"])
    three = timm.create_model("test_resnet", num_classes=3, pretrained=False)
    torch.save(three.state_dict(), path)
    with pytest.raises(CurationError, match=r"mis-shaped.*fc\.weight"):
        FrameClassifier(settings.out_of_body.classifier)
    curate_source(out, DEFAULTS)  # back to the heuristic for the other tests of the module


# ---------------------------------------------------------------------------------------------- dataset.curated
def test_training_on_the_curated_view_uses_the_kept_frames_only(source: tuple[Path, dict[str, str]]) -> None:
    out, expected = source
    curate_source(out, DEFAULTS, videos=load_video_exclusion(["case03"]), frames=load_frame_exclusion(["case01/8"]))
    cfg = {"name": "custom", "path": str(out), "curated": True}
    spec = resolve_mixture(cfg, out.parent).sources[0]
    assert spec.frames == 6 and spec.curation["dropped"]["excluded_video"] == 2
    for sampling in ("epoch", "resampled"):
        loader = build_train_loader(
            cfg,
            out.parent,
            lambda img: [torch.zeros(1)],
            batch_size=1,
            num_workers=0,
            sampling=sampling,
            steps_per_epoch=30 if sampling == "resampled" else None,
        )
        keys = {k.split("/", 1)[1] for b in loader for k in b["key"]}
        assert keys and not keys & set(expected), sampling
        if sampling == "epoch":
            assert len(keys) == 6


def test_a_missing_or_stale_view_stops_training_naming_curate(tmp_path: Path) -> None:
    frames = [jpeg_roundtrip(f) for f in endoscopic_videos()["prostatectomy"][:3]]
    out = write_frames_source(tmp_path, "s", {"v": frames})
    cfg = {"name": "custom", "path": str(out), "curated": True}
    with pytest.raises(CurationError, match=r"curated\.json does not exist.*surgenet_ssl\.curate"):
        resolve_mixture(cfg, tmp_path)
    curate_source(out, DEFAULTS)
    write_frames_source(tmp_path, "s", {"v": frames[:2]})  # re-prepared since: another shard
    with pytest.raises(CurationError, match=r"older than the source's shards.*surgenet_ssl\.curate"):
        resolve_mixture(cfg, tmp_path)
    view = out / "curation" / "curated.json"
    view.write_text(
        json.dumps(
            json.loads(view.read_text()) | {"shards": [{"file": "x", "sha256": "y", "frames": 1, "kept": [[0, 5]]}]}
        )
    )
    with pytest.raises(CurationError, match=r"shards\[0\]\.kept holds \[0, 5\]"):
        resolve_mixture(cfg, tmp_path)


def test_the_model_card_lists_the_curation_and_the_opt_out_lists() -> None:
    summary = {
        "frames": 15,
        "kept": 6,
        "dropped": {"dark": 1, "excluded_video": 2, "excluded_frame": 1, "blurry": 0},
        "thresholds": DEFAULTS.thresholds(),
        "exclusions": {
            "videos": {"origins": ["cholec80_test"], "ids": ["video41", "video42"], "matched": ["videos/video41"]},
            "frames": {"origins": ["optout.txt"], "keys": 3, "matched": 1},
        },
    }
    text = "\n".join(_curation_lines({"data_curation": {"cholec80": summary}}))
    assert "| cholec80 | 6 / 15 | dark 1, excluded_video 2, excluded_frame 1 |" in text
    assert (
        "1 matched of 2 ids from cholec80_test: videos/video41" in text
        and "1 matched of 3 keys from optout.txt" in text
    )
    assert '"max_hamming": 4' in text
    assert "not used" in "\n".join(_curation_lines({}))

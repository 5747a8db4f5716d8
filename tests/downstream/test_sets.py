"""The downstream sets as their users download them, on tiny replicas built here: Endoscapes2023 CVS and Seg50,
Cholec80 phases and tool presence, HeiChole phases (real short videos), their official splits and label fractions."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from data.data_media import write_video
from downstream.test_finetune import _cfg
from surgenet_ssl.downstream.classification_data import CHOLEC80_PHASES, csv_samples, load_classification_split
from surgenet_ssl.downstream.endoscapes import cvs_samples, read_seg_label_map
from surgenet_ssl.downstream.fractions import official_fraction
from surgenet_ssl.downstream.runner import prepare_data, run_finetune
from surgenet_ssl.downstream.segmentation_data import MaskReader, load_segmentation_split
from surgenet_ssl.downstream.video_sets import apply_split_defaults, read_heichole_phases

# Endoscapes: video -> CVS keyframes (frame, C1, C2, C3 as rater means); 3 train, 1 val, 1 test video
TRAIN = {
    "1": [(100, "0.67", "0", "1"), (105, "0.33", "1", "0")],
    "2": [(50, "1", "0.67", "0.33")],
    "3": [(10, "0", "0", "0")],
}
VAL = {"121": [(200, "1", "1", "1")]}
TEST = {"162": [(300, "0.33", "0.33", "0.67")]}


def _jpg(path: Path, value: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 16, 3), value, np.uint8)).save(path)


def make_endoscapes(root: Path) -> Path:
    """The release's layout: split folders, numpy-formatted video lists, all_metadata.csv with non-keyframe rows,
    the 12.5 % / 25 % fraction folders, Seg50 folders with shared semseg/ masks and seg_label_map.txt."""
    rows = ["vid,frame,is_ds_keyframe,C1,C2,C3,cvs_annotator_1"]
    for split, videos in (("train", TRAIN), ("val", VAL), ("test", TEST)):
        (root / split).mkdir(parents=True)
        (root / f"{split}_vids.txt").write_text("".join(f"{float(v):.18e}\n" for v in videos))  # np.savetxt
        for vid, frames in videos.items():
            for frame, c1, c2, c3 in frames:
                _jpg(root / split / f"{vid}_{frame}.jpg")
                _jpg(root / split / f"{vid}_{frame + 1}.jpg")  # an unlabelled 1-fps frame
                rows.append(f'{vid}.0,{frame},True,{c1},{c2},{c3},"[1, 0, 1]"')
                rows.append(f"{vid},{frame + 1},False,,,,")
    (root / "all_metadata.csv").write_text("\n".join(rows) + "\n")
    for folder, videos in (("12_5/train_0", ["2"]), ("12_5/train_1", ["3"]), ("25/train_0", ["1", "3"])):
        for vid in videos:
            for frame, *_ in TRAIN[vid]:
                _jpg(root / folder / f"{vid}_{frame}.jpg")
    # Seg50: masks of every split in one folder, class ids in 3 equal channels
    (root / "seg_label_map.txt").write_text("background: 0\ncystic_plate: 1\ncalot_triangle: 2\ntool: 3\n")
    for split, names in (("train_seg", ["1_100", "2_50"]), ("val_seg", ["121_200"])):
        (root / f"{split}_vids.txt").write_text("\n".join(sorted({n.split("_")[0] for n in names})) + "\n")
        for name in names:
            _jpg(root / split / f"{name}.jpg")
            ids = np.zeros((12, 16), np.uint8)
            ids[:, 8:] = int(name.split("_")[0]) % 4
            (root / "semseg").mkdir(exist_ok=True)
            Image.fromarray(np.dstack([ids] * 3)).save(root / "semseg" / f"{name}.png")
    return root


def test_endoscapes_cvs_thresholds_rater_means_and_reads_the_official_splits(tmp_path, caplog):
    root = make_endoscapes(tmp_path / "endoscapes")
    with caplog.at_level(logging.INFO):
        train = cvs_samples(root / "train")
    assert [(s.group, Path(s.path).name, s.target) for s in train] == [
        ("1", "1_100.jpg", (1, 0, 1)),  # 0.67 -> 1 (int(float()) made it 0)
        ("1", "1_105.jpg", (0, 1, 0)),  # 0.33 -> 0
        ("2", "2_50.jpg", (1, 1, 0)),
        ("3", "3_10.jpg", (0, 0, 0)),
    ]
    assert "4 keyframes of 3 videos" in caplog.text and "4 not keyframe" in caplog.text  # unlabelled rows counted
    assert {s.group for s in cvs_samples(root / "val")} == {"121"}
    assert [s.target for s in cvs_samples(root / "test")] == [(0, 0, 1)]
    # the same labels from the split's COCO json where the release has no all_metadata.csv
    coco = {"images": [{"file_name": "1_100.jpg", "ds": [0.67, 0.0, 1.0], "is_ds_keyframe": True},
                       {"file_name": "1_101.jpg", "ds": [0.67, 0.0, 1.0], "is_ds_keyframe": False},
                       {"file_name": "2_50.jpg", "ds": [1.0, 0.67, 0.33], "is_ds_keyframe": True}]}  # fmt: skip
    (root / "train" / "annotation_ds_coco.json").write_text(json.dumps(coco))
    (root / "all_metadata.csv").rename(root / "metadata.bak")
    assert [s.target for s in cvs_samples(root / "train")] == [(1, 0, 1), (1, 1, 0)]
    (root / "metadata.bak").rename(root / "all_metadata.csv")


def test_endoscapes_bad_values_and_missing_frames_name_file_and_row(tmp_path):
    root = make_endoscapes(tmp_path / "endoscapes")
    metadata = root / "all_metadata.csv"
    text = metadata.read_text()
    metadata.write_text(text.replace("1.0,100,True,0.67,0,1", "1.0,100,True,0.67,1.5,1"))
    with pytest.raises(ValueError, match=r"all_metadata\.csv, line 2 \(vid 1, frame 100\): C2='1\.5' is not a rater"):
        cvs_samples(root / "train")
    metadata.write_text(text)
    (root / "train" / "2_50.jpg").unlink()
    with pytest.raises(ValueError, match=r"CVS keyframe 2_50 has no image .*train/2_50\.jpg"):
        cvs_samples(root / "train")
    (tmp_path / "frames" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="not a split folder of the Endoscapes2023 release"):
        cvs_samples(tmp_path / "frames" / "train")
    # a plain CSV keeps refusing rater means, with file and line (not silently 0)
    (tmp_path / "cvs.csv").write_text("path,C1,C2,C3\na.jpg,1,0,0\nb.jpg,0.67,0,1\n")
    with pytest.raises(
        ValueError, match=r"cvs\.csv, line 3 \(b\.jpg\): multi-label values must be 0 or 1, got C1=0\.67"
    ):
        csv_samples(tmp_path / "cvs.csv")
    (tmp_path / "ok.csv").write_text("path,C1,C2,C3\na.jpg,1.0,0,1\n")
    assert csv_samples(tmp_path / "ok.csv")[0][0].target == (1, 0, 1)


def test_endoscapes_official_label_fractions(tmp_path):
    root = make_endoscapes(tmp_path / "endoscapes")
    samples = cvs_samples(root / "train")

    def data(fraction, **extra):
        return OmegaConf.create({"format": "endoscapes_cvs", "train": str(root / "train"), "train_fraction": fraction,
                                 **extra})  # fmt: skip

    keep, info = official_fraction(data(0.125), samples)
    assert [samples[i].group for i in keep] == ["2"] and info["fraction_by"] == "official"
    assert info["official_split"] == str(root / "12_5" / "train_0") and info["train_samples_used"] == 1
    keep, _ = official_fraction(data(0.125, fraction_fold=1), samples)
    assert [samples[i].group for i in keep] == ["3"]
    keep, info = official_fraction(data(0.25), samples)
    assert info["train_videos_used"] == ["1", "3"] and len(keep) == 3
    assert official_fraction(data(0.5), samples) is None  # no published 50 %: hash ranking
    assert official_fraction(data(0.25, official_fractions=False), samples) is None
    with pytest.raises(FileNotFoundError, match=r"25/train_2, which is missing"):
        official_fraction(data(0.25, fraction_fold=2), samples)


def test_endoscapes_seg50_shared_masks_and_label_map(tmp_path):
    root = make_endoscapes(tmp_path / "endoscapes")
    samples, classes, kind, fmt = load_segmentation_split(str(root / "train_seg"), "endoscapes_seg", None)
    assert classes == ["background", "cystic_plate", "calot_triangle", "tool"] and kind == "index"
    assert [(s.key, s.group) for s in samples] == [("1_100", "1"), ("2_50", "2")]
    assert samples[0].mask == str(root / "semseg" / "1_100.png")
    ids = MaskReader(kind, len(classes))(samples[1].mask)  # 3 equal channels read as class ids
    assert ids.shape == (12, 16) and set(np.unique(ids).tolist()) == {0, 2}
    val, _, _, _ = load_segmentation_split(str(root / "val_seg"), "endoscapes_seg", None)
    assert [s.key for s in val] == ["121_200"]
    (root / "semseg" / "2_50.png").unlink()
    with pytest.raises(ValueError, match=r"2_50\.jpg has no mask: expected .*semseg/2_50\.png"):
        load_segmentation_split(str(root / "train_seg"), "endoscapes_seg", None)
    (root / "seg_label_map.txt").write_text("{'background': 0, 'tool': 2}")
    with pytest.raises(ValueError, match=r"class ids must be 0\.\.1, each once; got \[0, 2\]"):
        read_seg_label_map(root / "seg_label_map.txt")


def make_cholec80(root: Path, videos=("video01", "video02", "video41"), frames: int = 60) -> Path:
    """videos/videoNN.mp4 (25 fps, ``frames`` frames), a phase row per frame (the last 5 frames unannotated),
    a tool row every 25th frame."""
    for n, vid in enumerate(videos):
        write_video(root / "videos" / f"{vid}.mp4", frames=frames)
        phases = ["Frame\tPhase"] + [f"{i}\t{CHOLEC80_PHASES[min(i // 25 + n, 6)]}" for i in range(frames - 5)]
        (root / "phase_annotations").mkdir(parents=True, exist_ok=True)
        (root / "phase_annotations" / f"{vid}-phase.txt").write_text("\n".join(phases) + "\n")
        tools = ["Frame\tGrasper\tBipolar\tHook\tScissors\tClipper\tIrrigator\tSpecimenBag"]
        tools += [f"{i}\t{int(i == 25)}\t0\t1\t0\t0\t0\t{n % 2}" for i in range(0, frames, 25)]
        (root / "tool_annotations").mkdir(exist_ok=True)
        (root / "tool_annotations" / f"{vid}-tool.txt").write_text("\n".join(tools) + "\n")
    return root


def _data(fmt: str, release: Path, frames: Path, **extra):
    return OmegaConf.create({"format": fmt, "train": str(release), "val": str(release), "frames_dir": str(frames),
                             "train_videos": None, "val_videos": None, **extra})  # fmt: skip


def test_cholec80_phases_and_tools_from_the_videos_with_the_split(tmp_path, caplog, monkeypatch):
    release, frames = make_cholec80(tmp_path / "cholec80"), tmp_path / "frames"
    cfg = _data("cholec80_phase", release, frames, train_videos=["video01", "video02"], val_videos="video41")
    with caplog.at_level(logging.INFO):
        train, criteria, fmt = load_classification_split(cfg, "train")
    # 60 frames at 25 fps -> frames 0, 25, 50 (1 fps), each labelled by the phase row of its own index
    assert criteria is None and fmt == "cholec80_phase"
    assert [s.key for s in train] == [f"video0{v}/video0{v}_{i:06d}.jpg" for v in (1, 2) for i in (0, 25, 50)]
    assert [s.target for s in train] == [
        "Preparation", "CalotTriangleDissection", "ClippingCutting",
        "CalotTriangleDissection", "ClippingCutting", "GallbladderDissection",
    ]  # fmt: skip
    assert {s.group for s in train} == {"video01", "video02"} and not (frames / "cholec80" / "video41").exists()
    val, _, _ = load_classification_split(cfg, "val")
    assert [s.key for s in val] == [f"video41/video41_{i:06d}.jpg" for i in (0, 25, 50)]
    assert Image.open(val[1].path).size == (64, 48)
    # tool presence: multi-label, the 7 tools of the header, on the same extracted frames (not decoded again)
    import surgenet_ssl.downstream.video_sets as video_sets

    monkeypatch.setattr(video_sets, "iter_video_frames", lambda *a, **k: pytest.fail("decoded again"))
    tools_cfg = _data("cholec80_tool", release, frames, train_videos=["video01", "video02"])
    tools, criteria, _ = load_classification_split(tools_cfg, "train")
    assert criteria == ["Grasper", "Bipolar", "Hook", "Scissors", "Clipper", "Irrigator", "SpecimenBag"]
    assert [s.target for s in tools[:3]] == [(0, 0, 1, 0, 0, 0, 0), (1, 0, 1, 0, 0, 0, 0), (0, 0, 1, 0, 0, 0, 0)]
    assert tools[3].target[-1] == 1 and len(tools) == 6


def test_cholec80_default_split_bad_rows_and_tail_count(tmp_path, caplog):
    release, frames = make_cholec80(tmp_path / "cholec80", videos=("video01",), frames=60), tmp_path / "frames"
    (release / "phase_annotations" / "video01-phase.txt").write_text(
        "Frame\tPhase\n" + "".join(f"{i}\tPreparation\n" for i in range(30))
    )
    with caplog.at_level(logging.INFO):
        samples, _, _ = load_classification_split(_data("cholec80_phase", release, frames), "train")
    assert [s.key for s in samples] == ["video01/video01_000000.jpg", "video01/video01_000025.jpg"]
    assert "1 frame(s) after the last annotated row of their video left out" in caplog.text
    # no split on the command line: the usual 40/40 with the shipped lists, val = the same release
    cfg = OmegaConf.create({"format": "cholec80_tool", "train": str(release), "val": None, "val_groups": None,
                            "train_videos": None, "val_videos": None})  # fmt: skip
    assert apply_split_defaults(cfg) and cfg.val == str(release)
    assert (cfg.train_videos, cfg.val_videos) == ("cholec80_train", "cholec80_test")
    cfg.frames_dir = str(frames)
    with pytest.raises(ValueError, match=r"data\.train_videos \(cholec80_train\): 39 listed video\(s\) not in"):
        load_classification_split(cfg, "train")
    assert not apply_split_defaults(OmegaConf.create({"format": "cholec80_tool", "train": "x", "val_groups": ["a"]}))
    tool_file = release / "tool_annotations" / "video01-tool.txt"
    tool_file.write_text(tool_file.read_text().replace("25\t1\t0\t1", "25\t2\t0\t1"))
    with pytest.raises(ValueError, match=r"video01-tool\.txt, line 3: expected a frame index and 7 values 0/1"):
        load_classification_split(_data("cholec80_tool", release, frames), "train")
    tool_file.write_text("Frame\tGrasper\n0\t1\n50\t0\n")
    with pytest.raises(ValueError, match=r"video01-tool\.txt: no row for frame 25 of .*video01\.mp4"):
        load_classification_split(_data("cholec80_tool", release, frames), "train")


def test_heichole_phases_at_25_and_50_fps_without_hd_copies_and_skill_clips(tmp_path):
    release, frames = tmp_path / "HeiChole", tmp_path / "frames"
    write_video(release / "Videos" / "Full" / "Hei-Chole1.mp4", frames=60, fps=25)
    write_video(release / "Videos" / "Full" / "Hei-Chole2.mp4", frames=60, fps=50)
    write_video(release / "Videos" / "Full" / "HD" / "Hei-Chole1.mp4", frames=10)  # duplicate copy: not used
    write_video(release / "Videos" / "Skill" / "Hei-Chole1.mp4", frames=10)  # skill clip: not used
    phase_dir = release / "Annotations" / "Phase"
    phase_dir.mkdir(parents=True)
    (phase_dir / "Hei-Chole1_Annotation_Phase.csv").write_text("".join(f"{i},{i // 25}\n" for i in range(60)))
    (phase_dir / "Hei-Chole2_Annotation_Phase.csv").write_text("".join(f"{i},{3 + i // 50}\n" for i in range(60)))
    samples, criteria, _ = load_classification_split(_data("heichole_phase", release, frames), "train")
    assert criteria is None
    assert [(s.key, s.target) for s in samples] == [
        ("Hei-Chole1/Hei-Chole1_000000.jpg", "Preparation"),
        ("Hei-Chole1/Hei-Chole1_000025.jpg", "CalotTriangleDissection"),
        ("Hei-Chole1/Hei-Chole1_000050.jpg", "ClippingCutting"),
        ("Hei-Chole2/Hei-Chole2_000000.jpg", "GallbladderDissection"),  # 50 fps: every 50th frame
        ("Hei-Chole2/Hei-Chole2_000050.jpg", "GallbladderPackaging"),
    ]
    (phase_dir / "Hei-Chole2_Annotation_Phase.csv").write_text("0,3\n1,9\n")
    with pytest.raises(
        ValueError, match=r"Hei-Chole2_Annotation_Phase\.csv, line 2: expected '<frame index>,<phase id 0-6>'"
    ):
        read_heichole_phases(phase_dir / "Hei-Chole2_Annotation_Phase.csv")


def test_finetune_on_endoscapes_uses_the_official_fraction_and_cholec80_its_phase_order(tmp_path):
    root = make_endoscapes(tmp_path / "endoscapes")
    out = tmp_path / "out"
    cfg = _cfg(
        out,
        "task=classification",
        "weights=null",
        "seeds=[0]",
        "data.format=endoscapes_cvs",
        f"data.train={root / 'train'}",
        f"data.val={root / 'val'}",
        "data.train_fraction=0.25",
        "trainer.check_val_every_n_epoch=0",
        "trainer.log_every_n_steps=1",
    )
    results = run_finetune(cfg, overrides=[])
    assert results is not None and results["task"] == "multilabel_classification"
    assert results["class_names"] == ["C1", "C2", "C3"] and results["primary_metric"] == "mAP"
    data = json.loads((out / "results.json").read_text())["data"]
    assert data["fraction_by"] == "official" and data["official_split"] == str(root / "25" / "train_0")
    assert data["train_videos_used"] == ["1", "3"] and data["train_samples_used"] == 3
    assert data["train"]["per_class"] == {"C1": 1, "C2": 1, "C3": 1} and data["val"]["samples"] == 1
    # Cholec80 phases: the 7 phases in their published order, whichever occur in the training frames
    release = make_cholec80(tmp_path / "cholec80", videos=("video01", "video41"))
    cfg = _cfg(
        tmp_path / "out2",
        "task=classification",
        "data.format=cholec80_phase",
        f"data.train={release}",
        f"data.frames_dir={tmp_path / 'frames'}",
        "data.train_videos=[video01]",
        "data.val_videos=[video41]",
    )
    cfg.data.val = cfg.data.train
    prepared = prepare_data(cfg)
    assert prepared.class_names == list(CHOLEC80_PHASES) and len(prepared.train) == len(prepared.val) == 3
    assert prepared.summary["train"]["per_class"]["CalotTriangleDissection"] == 1


def test_label_files_are_size_bounded_before_they_are_read(tmp_path) -> None:
    from surgenet_ssl.runtime.io_utils import read_text_bounded

    big = tmp_path / "seg_label_map.txt"
    big.write_text("background: 0\n" * 100)
    assert read_text_bounded(big, 10_000).startswith("background")
    with pytest.raises(ValueError, match=r"seg_label_map.txt is 1,400 bytes, more than the 100 such a file can be"):
        read_text_bounded(big, 100)

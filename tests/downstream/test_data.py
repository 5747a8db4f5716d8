"""Downstream datasets (generic, CholecSeg8k, CSV, Cholec80 phases), joint augmentation and the labelled demo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from downstream.helpers import make_seg_folder
from surgenet_ssl.downstream.classification_data import cholec80_samples, csv_samples, read_phase_annotation
from surgenet_ssl.downstream.segmentation_data import (
    CHOLECSEG8K_CLASSES,
    MaskReader,
    SegmentationDataset,
    cholecseg8k_samples,
    folder_samples,
    load_segmentation_split,
    read_class_names,
)
from surgenet_ssl.downstream.transforms import SegmentationTransform


def test_folder_layout_pairs_groups_and_classes(tmp_path):
    make_seg_folder(tmp_path / "train", per_case=2)
    samples, classes, kind, fmt = load_segmentation_split(str(tmp_path / "train"), "auto", None)
    assert fmt == "folder" and kind == "index" and classes == ["background", "tissue", "tool"]
    assert len(samples) == 4 and {s.group for s in samples} == {"case1", "case2"}
    assert samples[0].key == "case1/case1_000" and samples[0].mask.endswith("masks/case1/case1_000.png")
    reader = MaskReader("index", 3)
    ds = SegmentationDataset(samples, classes, reader, SegmentationTransform((32, 32), train=False))
    x, y, i = ds[0]
    assert x.shape == (3, 32, 32) and y.shape == (64, 64) and set(y.unique().tolist()) == {0, 1, 2}
    counts = ds.validate()
    assert sum(counts.values()) == 4 * 64 * 64 and counts["<ignored>"] == 0


def test_bad_segmentation_input_names_the_file(tmp_path):
    split = make_seg_folder(tmp_path / "s", cases=("c",), per_case=2)
    reader = MaskReader("index", 3)
    # class id out of range
    mask_path = split / "masks" / "c" / "c_000.png"
    Image.fromarray(np.full((64, 64), 7, np.uint8), mode="L").save(mask_path)
    with pytest.raises(ValueError, match=r"c_000\.png has class id\(s\) \[7\] out of range: 3 classes"):
        reader(str(mask_path))
    # size mismatch
    Image.fromarray(np.ones((32, 64), np.uint8), mode="L").save(mask_path)
    ds = SegmentationDataset(folder_samples(split), list("abc"), reader, SegmentationTransform((32, 32), False))
    with pytest.raises(ValueError, match=r"size mismatch: .*c_000\.png is 64x64 but .*c_000\.png is 64x32"):
        ds.validate()
    with pytest.raises(ValueError, match="size mismatch"):
        ds[0]
    # colour masks are not class ids
    Image.fromarray(
        np.dstack([np.zeros((64, 64), np.uint8), np.ones((64, 64), np.uint8), np.zeros((64, 64), np.uint8)])
    ).save(mask_path)
    with pytest.raises(ValueError, match="is a colour image"):
        reader(str(mask_path))
    # a missing mask, a missing class list, an empty split
    mask_path.unlink()
    with pytest.raises(ValueError, match=r"c_000\.png has no mask: expected .*masks/c/c_000\.png"):
        folder_samples(split)
    (split / "classes.txt").unlink()
    with pytest.raises(ValueError, match="No class names"):
        read_class_names(split)
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    with pytest.raises(ValueError, match="Empty split"):
        folder_samples(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="images"):
        folder_samples(tmp_path / "nowhere")


def test_cholecseg8k_watershed_and_colour_masks(tmp_path):
    folder = tmp_path / "video01" / "video01_00080"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(folder / "frame_80_endo.png")
    grey = np.array([[50, 11, 21, 13, 12, 31], [23, 24, 25, 32, 22, 33], [5, 255, 0, 50, 50, 50], [50] * 6], np.uint8)
    Image.fromarray(np.dstack([grey] * 3)).save(folder / "frame_80_endo_watershed_mask.png")
    colours = {0: (127, 127, 127), 5: (170, 255, 0), 10: (255, 160, 165)}
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[:] = colours[0]
    rgb[0, 1], rgb[0, 2], rgb[1, 1] = colours[5], colours[10], (255, 255, 255)
    Image.fromarray(rgb).save(folder / "frame_80_endo_color_mask.png")
    samples, classes, kind, fmt = load_segmentation_split(str(tmp_path), "auto", None)
    assert fmt == "cholecseg8k" and kind == "watershed" and classes == list(CHOLECSEG8K_CLASSES)
    assert len(samples) == 1 and samples[0].group == "video01"
    ids = MaskReader("watershed", 13)(samples[0].mask)
    assert ids[0].tolist() == [0, 1, 2, 3, 4, 5] and ids[1].tolist() == [6, 7, 8, 9, 10, 11]
    assert ids[2, :3].tolist() == [12, 255, 255]  # the white edge and unlabelled pixels are ignored
    colour_ids = MaskReader("color", 13)(cholecseg8k_samples(tmp_path, "color")[0].mask)
    assert colour_ids[0, :3].tolist() == [0, 5, 10] and colour_ids[1, 1] == 255
    grey[3, 0] = 77
    Image.fromarray(np.dstack([grey] * 3)).save(folder / "frame_80_endo_watershed_mask.png")
    with pytest.raises(ValueError, match=r"grey value\(s\) \[77\] that are not CholecSeg8k"):
        MaskReader("watershed", 13)(samples[0].mask)


def test_joint_augmentation_keeps_image_and_mask_aligned():
    rng = np.random.default_rng(0)
    mask = np.zeros((64, 96), np.int64)
    mask[10:40, 20:50], mask[45:60, 60:90] = 1, 2
    image = np.stack([mask * 100, mask * 50, np.full_like(mask, 30)], -1).astype(np.uint8)
    tf = SegmentationTransform((32, 48), train=True, scale=(0.5, 1.5), hflip=0.5, vflip=0.5, color_jitter=0.0)
    for _ in range(10):
        x, y = tf(image, mask, rng)
        assert x.shape == (3, 32, 48) and y.shape == (32, 48)
        red = x[0] * 0.229 * 255 + 0.485 * 255  # undo the normalisation of the first channel
        valid = y != 255
        from_image = torch.round(red / 100).long().clamp(0, 2)
        agree = (from_image[valid] == y[valid]).float().mean().item()
        assert agree > 0.95  # only pixels on region borders (bilinear image vs nearest mask) may differ
    # a pure flip is exact; upscaling beyond the crop never pads, downscaling pads the mask with ignore
    x, y = SegmentationTransform((64, 96), True, (1.0, 1.0), hflip=1.0, color_jitter=0.0)(image, mask, rng)
    assert torch.equal(y, torch.from_numpy(mask[:, ::-1].copy()))
    _, y = SegmentationTransform((64, 96), True, (0.5, 0.5), hflip=0.0, color_jitter=0.0)(image, mask, rng)
    assert (y[32:] == 255).all() and (y[:32, :48] != 255).all()


def test_csv_single_and_multi_label_and_errors(tmp_path):
    (tmp_path / "a.csv").write_text("path,label,video\nimg/1.jpg,Preparation,v1\nimg/2.jpg,ClippingCutting,v2\n")
    samples, criteria = csv_samples(tmp_path / "a.csv")
    assert criteria is None and [s.target for s in samples] == ["Preparation", "ClippingCutting"]
    assert samples[0].path == str(tmp_path / "img" / "1.jpg") and samples[1].group == "v2"
    (tmp_path / "cvs.csv").write_text("image,c1,c2,c3,case\nx.png,1,0,1,p1\ny.png,0,0,0,p2\n")
    samples, criteria = csv_samples(tmp_path / "cvs.csv")
    assert criteria == ["c1", "c2", "c3"] and samples[0].target == (1, 0, 1) and samples[0].group == "p1"
    (tmp_path / "bad.csv").write_text("path,label\nimg/1.jpg,\n")
    with pytest.raises(ValueError, match=r"bad\.csv, line 2 \(img/1\.jpg\): missing label"):
        csv_samples(tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text("path,c1,c2\nx.png,1,2\n")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        csv_samples(tmp_path / "bad2.csv")
    (tmp_path / "empty.csv").write_text("path,label\n")
    with pytest.raises(ValueError, match="Empty split"):
        csv_samples(tmp_path / "empty.csv")


def test_csv_from_excel_with_a_byte_order_mark_and_a_latin1_csv_named(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM; a latin-1 file is an error that names the file, the line and the fix."""
    (tmp_path / "excel.csv").write_bytes("path,label,video\r\nimg/é1.jpg,Preparation,v1\r\n".encode("utf-8-sig"))
    samples, criteria = csv_samples(tmp_path / "excel.csv")
    assert criteria is None and samples[0].key == "img/é1.jpg" and samples[0].target == "Preparation"
    assert samples[0].group == "v1"
    (tmp_path / "latin.csv").write_bytes("path,label\nimg/1.jpg,Préparation\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.csv: not UTF-8 text \(byte 0xe9 at line 2.*iconv -f latin1"):
        csv_samples(tmp_path / "latin.csv")


def test_cholec80_phase_annotations_map_frame_numbers_by_fps(tmp_path):
    ann = tmp_path / "phase_annotations"
    ann.mkdir()
    rows = ["Frame\tPhase"] + [f"{i}\t{'Preparation' if i < 50 else 'CalotTriangleDissection'}" for i in range(100)]
    (ann / "video01-phase.txt").write_text("\n".join(rows) + "\n")
    assert read_phase_annotation(ann / "video01-phase.txt")[49:51] == ["Preparation", "CalotTriangleDissection"]
    frames = tmp_path / "frames" / "video01"
    frames.mkdir(parents=True)
    for n in (1, 2, 3, 4):  # ffmpeg numbering from 1, extracted at 1 fps from 25 fps video
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(frames / f"video01_{n:06d}.png")
    samples = cholec80_samples(tmp_path / "frames", ann, annotation_fps=25, frames_fps=1, first_frame_number=1)
    # frame n -> annotation row (n - 1) x 25: 0, 25 (Preparation), 50, 75 (CalotTriangleDissection)
    assert [s.target for s in samples] == [
        "Preparation",
        "Preparation",
        "CalotTriangleDissection",
        "CalotTriangleDissection",
    ]
    assert {s.group for s in samples} == {"video01"}
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(frames / "video01_000005.png")  # row 100: not annotated
    with pytest.raises(ValueError, match=r"video01_000005\.png: frame number 000005 -> annotation frame 100"):
        cholec80_samples(tmp_path / "frames", ann, 25, 1, 1)


def test_labelled_demo_has_masks_phases_and_both_layouts(demo_labels: Path):
    from surgenet_ssl.data.demo_labels import PHASES, SEGMENTATION_CLASSES, render_labelled_case

    frames, masks, phases = render_labelled_case("prostatectomy", 1, seconds=2)
    assert len(frames) == len(masks) == len(phases) == 16 and set(phases) <= set(PHASES)
    with_tools = [m for m, p in zip(masks, phases, strict=True) if p != "exposure"]
    assert all((m == 3).any() for m in with_tools)  # robotic instruments drawn where the phase has instruments
    assert all(not (m >= 2).any() for m, p in zip(masks, phases, strict=True) if p == "exposure")
    assert (masks[0][-14:] == 0).all()  # the console overlay is background
    train = demo_labels / "segmentation" / "train"
    samples, classes, _, _ = load_segmentation_split(str(train), "auto", None)
    assert classes == list(SEGMENTATION_CLASSES) and len(samples) == 144 and len({s.group for s in samples}) == 9
    csv_rows, _ = csv_samples(demo_labels / "phases" / "val.csv")
    assert len(csv_rows) == 48 and Path(csv_rows[0].path).is_file()
    by_annotation = cholec80_samples(train / "images", demo_labels / "phases" / "annotations", 8, 2)
    train_csv, _ = csv_samples(demo_labels / "phases" / "train.csv")
    assert [s.target for s in by_annotation] == [s.target for s in sorted(train_csv, key=lambda s: Path(s.path).name)]

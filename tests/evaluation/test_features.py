"""Image folders -> features: transform values, label alignment, and counted skips for bad input."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from evaluation.helpers import make_image_folder
from surgenet_ssl.evaluation import ImageFolderDataset, extract_features, resolve_device

# "backbone" whose features are the per-channel means of the normalised image: hand-checkable
MEAN_POOL = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _solid(path, rgb, size=40):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), rgb, dtype=np.uint8)).save(path)


def test_features_are_imagenet_normalised_center_crops(tmp_path):
    _solid(tmp_path / "a" / "0.png", (124, 116, 104))  # ~ ImageNet mean * 255 -> ~0
    _solid(tmp_path / "b" / "0.jpg", (255, 0, 0))
    ds = ImageFolderDataset(tmp_path, image_size=32)
    assert ds.classes == ["a", "b"] and [label for _, label in ds.samples] == [0, 1]
    image, label, ok = ds[0]
    assert image.shape == (3, 32, 32) and ok and label == 0
    out = extract_features(MEAN_POOL, ds, batch_size=2, device="cpu")
    assert out.features.shape == (2, 3) and out.labels.tolist() == [0, 1] and out.failed == []
    assert out.features[0].abs().max().item() < 0.01
    # pure red through JPEG: channel means about (1 - 0.485) / 0.229 = 2.249, (0 - 0.456) / 0.224 = -2.036
    assert out.features[1, 0].item() == pytest.approx(2.249, abs=0.05)
    assert out.features[1, 1].item() == pytest.approx(-2.036, abs=0.1)


def test_validation_uses_training_indices_and_rejects_unknown_classes(tmp_path):
    make_image_folder(tmp_path / "train", 2)
    make_image_folder(tmp_path / "val", 1, classes=["red", "green"])
    train = ImageFolderDataset(tmp_path / "train", image_size=32)
    val = ImageFolderDataset(tmp_path / "val", image_size=32, classes=train.classes, min_classes=1)
    assert train.classes == ["blue", "green", "red"]
    assert sorted(label for _, label in val.samples) == [1, 2]
    (tmp_path / "val" / "purple").mkdir()
    _solid(tmp_path / "val" / "purple" / "0.png", (128, 0, 128))
    with pytest.raises(ValueError, match=r"\['purple'\] that are not among the training classes"):
        ImageFolderDataset(tmp_path / "val", image_size=32, classes=train.classes, min_classes=1)


def test_empty_class_folder_is_skipped_and_counted(tmp_path, caplog):
    make_image_folder(tmp_path, 2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "red" / ".DS_Store").write_bytes(b"\0")
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(tmp_path, image_size=32)
    assert ds.classes == ["blue", "green", "red"]
    assert ds.empty_classes == ["empty", "notes"] and ds.ignored_files == 1
    assert "Skipping 2 empty class folder(s)" in caplog.text and "empty, notes" in caplog.text
    assert len(ds) == 6


def test_fewer_than_two_classes_is_a_clear_error(tmp_path):
    make_image_folder(tmp_path / "one", 3, classes=["red"])
    with pytest.raises(ValueError, match="only 1 class folder.*at least 2 classes"):
        ImageFolderDataset(tmp_path / "one")
    (tmp_path / "one" / "green").mkdir()  # an empty second class does not count
    with pytest.raises(ValueError, match=r"empty folders skipped: \['green'\]"):
        ImageFolderDataset(tmp_path / "one")
    (tmp_path / "flat").mkdir()
    _solid(tmp_path / "flat" / "0.png", (0, 0, 0))
    with pytest.raises(ValueError, match="No class subfolders"):
        ImageFolderDataset(tmp_path / "flat")
    with pytest.raises(FileNotFoundError, match="Image folder not found"):
        ImageFolderDataset(tmp_path / "missing")


def test_undecodable_images_are_skipped_and_counted(tmp_path, caplog):
    make_image_folder(tmp_path, 3)
    (tmp_path / "red" / "garbage.jpg").write_bytes(b"this is not a jpeg")
    good = (tmp_path / "blue" / "000.png").read_bytes()
    (tmp_path / "blue" / "truncated.png").write_bytes(good[: len(good) // 2])
    ds = ImageFolderDataset(tmp_path, image_size=32)
    assert len(ds) == 11
    with caplog.at_level(logging.WARNING):
        out = extract_features(MEAN_POOL, ds, batch_size=4, num_workers=0, device="cpu")
    assert len(out.failed) == 2 and {p.rsplit("/", 1)[-1] for p in out.failed} == {"garbage.jpg", "truncated.png"}
    assert out.features.shape == (9, 3) and out.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(out.paths) == 9 and not any(p in out.paths for p in out.failed)
    assert "Skipped 2 undecodable image(s) of 11" in caplog.text


def test_non_pooled_backbone_output_is_refused(tmp_path):
    make_image_folder(tmp_path, 1)
    with pytest.raises(ValueError, match="not pooled"):
        extract_features(nn.Identity(), ImageFolderDataset(tmp_path, image_size=32), device="cpu")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_model_mode_is_restored_and_device_none_keeps_the_model_where_it_is(tmp_path):
    make_image_folder(tmp_path, 1)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout(0.9), nn.AdaptiveAvgPool2d(1), nn.Flatten()).train()
    ds = ImageFolderDataset(tmp_path, image_size=32)
    a = extract_features(model, ds, device=None)
    b = extract_features(model, ds, device=None)
    assert model.training  # restored
    assert torch.equal(a.features, b.features)  # dropout was off during extraction

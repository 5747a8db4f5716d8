"""``python -m surgenet_ssl.evaluate`` end to end on tiny generated folders, and its errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from backbones.surgenet_keyfile import surgenet_keys
from evaluation.helpers import make_image_folder
from surgenet_ssl.backbones import build_backbone
from surgenet_ssl.config.dirs import CONFIG_DIR
from surgenet_ssl.evaluate import build_model, evaluate

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "surgenet_ssl.evaluate", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _dino_checkpoint(path: Path) -> Path:
    """A full-DINO-checkpoint-shaped file for timm test_resnet (teacher backbone + head, student)."""
    torch.manual_seed(0)
    backbone = build_backbone("timm", timm_name="test_resnet").state_dict()
    teacher = {f"backbone.{k}": v for k, v in backbone.items()} | {"head.last_layer.weight": torch.zeros(8, 96)}
    torch.save({"teacher": teacher, "student": dict(teacher), "epoch": 3}, path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaluate")
    make_image_folder(root / "train", 8)
    make_image_folder(root / "val", 3, seed=1)
    (root / "train" / "empty_class").mkdir()
    (root / "val" / "red" / "broken.jpg").write_bytes(b"not a jpeg")
    _dino_checkpoint(root / "resnet_dino.pth")
    return root


def test_cli_end_to_end(folders, tmp_path):
    out = tmp_path / "results"
    proc = _run(
        [
            "weights=" + str(folders / "resnet_dino.pth"),
            "backbone=timm",
            "backbone.timm_name=test_resnet",
            f"data.train={folders / 'train'}",
            f"data.val={folders / 'val'}",
            "data.image_size=32",
            "data.num_workers=0",
            "data.batch_size=5",
            f"output={out}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("knn_top1="), proc.stdout[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert float(last.split("=", 1)[1]) == pytest.approx(results["knn_top1"], abs=1e-4)
    # colour classes are trivially separable, even for random features: label alignment train/val is right
    assert results["knn_top1"] >= 0.85 and results["knn_top5"] == 1.0
    assert 0.0 <= results["linear_probe_accuracy"] <= 1.0
    assert results["class_names"] == ["blue", "green", "red"] and results["feature_dim"] == 96
    assert results["train"]["images"] == 24 and results["train"]["skipped_empty_class_folders"] == ["empty_class"]
    assert results["val"]["images"] == 9 and results["val"]["skipped_undecodable"] == 1
    assert results["knn"]["k_used"] == 20 and results["device"] in ("cpu", "cuda")
    assert "Loaded" in results["weights_loaded"] and "dino_checkpoint[teacher]" in results["weights_loaded"]
    assert (out / "embedding_map.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_weights_for_another_backbone_is_a_short_error(folders, tmp_path):
    proc = _run(
        [
            "weights=" + str(folders / "resnet_dino.pth"),
            "backbone=timm",
            "backbone.timm_name=test_convnext",
            f"data.train={folders / 'train'}",
            f"data.val={folders / 'val'}",
            "data.image_size=32",
            "data.num_workers=0",
            f"output={tmp_path / 'out'}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert "cannot be loaded into backbone=test_convnext" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "results.json").exists()


def _cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("evaluate", overrides=[f"output={tmp_path / 'out'}", *overrides])


def test_single_class_and_missing_settings_are_clear_errors(tmp_path):
    make_image_folder(tmp_path / "one", 2, classes=["red"])
    make_image_folder(tmp_path / "val", 1)
    cfg = _cfg(
        tmp_path,
        "weights=null",
        "backbone=timm",
        "backbone.timm_name=test_resnet",
        f"data.train={tmp_path / 'one'}",
        f"data.val={tmp_path / 'val'}",
    )
    with pytest.raises(ValueError, match="only 1 class folder"):
        evaluate(cfg)
    with pytest.raises(ValueError, match=r"missing required setting\(s\) weights, data.train"):
        evaluate(_cfg(tmp_path, f"data.val={tmp_path / 'val'}"))
    with pytest.raises(FileNotFoundError, match="Weights file not found"):
        build_model(
            _cfg(tmp_path, f"weights={tmp_path / 'nope.pth'}", "backbone=timm", "backbone.timm_name=test_resnet")
        )


def _published_teacher(backbone: str) -> dict[str, torch.Tensor]:
    """Zero tensors with the published names/shapes (tests/backbones/surgenet_keys); must exist, never skipped."""
    return {name: torch.zeros(()).expand(shape) for name, shape in surgenet_keys(backbone).items()}


def test_published_caformer_teacher_for_convnext_is_refused(tmp_path):
    weights = tmp_path / "SurgeNetXL_checkpoint_epoch0050_teacher.pth"
    torch.save(_published_teacher("caformer_s18"), weights)
    with pytest.raises(ValueError, match="cannot be loaded into backbone=convnextv2_tiny"):
        build_model(_cfg(tmp_path, f"weights={weights}", "backbone=convnextv2_tiny"))

"""Export -> load -> the same features as the teacher in the checkpoint, through every artefact and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from backbones.surgenet_keyfile import surgenet_keys
from support.tiny_training import crop_batches, tiny_dino
from surgenet_ssl.backbones import build_backbone
from surgenet_ssl.callbacks import TeacherExport
from surgenet_ssl.models import caformer_s18, load_backbone_weights
from surgenet_ssl.training.module import DINOModule


def _export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "surgenet_ssl.export", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, DINOModule]:
    """A CaFormer-S18 DINO run of 2 steps, checkpointed the way training does (run config included)."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = DINOModule({"name": "caformer_s18", "drop_path_rate": 0.1}, tiny_dino(), batch_size=2)
    run_config = {"dataset": {"name": "cholec"}, "backbone": {"name": "caformer_s18"}, "data": {"batch_size": 2}}
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[TeacherExport(root / "auto_export", "cholec", run_config)],
    )
    trainer.fit(model, train_dataloaders=crop_batches(2, batch_size=2))
    ckpt = root / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt, model


def _teacher_features(model: DINOModule, x: torch.Tensor) -> torch.Tensor:
    backbone = model.teacher.backbone.eval()
    with torch.no_grad():
        return backbone(x)


def test_export_cli_artefacts_load_back_to_identical_teacher_features(trained, tmp_path):
    ckpt, model = trained
    out = tmp_path / "export"
    proc = _export(f"ckpt={ckpt}", f"output={out}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"export_dir={out}"
    stem = "cholec_caformer_s18_epoch0001"
    x = torch.randn(2, 3, 64, 64)
    expected = _teacher_features(model, x)

    # 1. the SurgeNet-format .pth through the published-style constructor
    pth = out / f"{stem}_teacher.pth"
    sd = torch.load(pth, weights_only=True)
    assert {k: tuple(v.shape) for k, v in sd.items()} == surgenet_keys("caformer_s18")
    clf = caformer_s18(num_classes=0, pretrained="SurgeNet", pretrained_weights=str(pth)).eval()
    with torch.no_grad():
        assert torch.allclose(clf(x), expected, atol=1e-5)

    # 2. the timm-named .safetensors and 3. the full DINO checkpoint, through the one loader
    for artefact in (f"{stem}_teacher.safetensors", f"{stem}_checkpoint.pth"):
        backbone = build_backbone("caformer_s18").eval()
        report = load_backbone_weights(backbone, str(out / artefact), backbone="caformer_s18")
        assert report.loaded == 152 and not report.missing and not report.unexpected
        with torch.no_grad():
            assert torch.allclose(backbone(x), expected, atol=1e-5), artefact

    # 4. the Lightning checkpoint itself
    backbone = build_backbone("caformer_s18").eval()
    load_backbone_weights(backbone, str(ckpt), backbone="caformer_s18")
    with torch.no_grad():
        assert torch.allclose(backbone(x), expected, atol=1e-5)
    assert "sha256" in (out / "README.md").read_text()


def test_export_from_full_dino_checkpoint_and_automatic_export(trained, tmp_path):
    ckpt, model = trained
    auto = ckpt.parent.parent / "auto_export"
    assert (auto / "cholec_caformer_s18_epoch0001_teacher.pth").is_file()  # written at the end of training
    proc = _export(f"ckpt={auto / 'cholec_caformer_s18_epoch0001_checkpoint.pth'}", f"output={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    again = torch.load(tmp_path / "cholec_caformer_s18_epoch0001_teacher.pth", weights_only=True)
    original = torch.load(auto / "cholec_caformer_s18_epoch0001_teacher.pth", weights_only=True)
    assert again.keys() == original.keys()
    assert all(torch.equal(again[k], original[k]) for k in original)


def test_export_bad_input_is_refused_clearly(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    proc = _export(f"ckpt={junk}")
    assert proc.returncode == 2 and f"Cannot read {junk}: file is truncated or corrupt" in proc.stderr
    torch.save({"model": {}}, tmp_path / "other.pth")
    proc = _export(f"ckpt={tmp_path / 'other.pth'}")
    assert proc.returncode == 2 and "neither a surgenet-ssl Lightning checkpoint" in proc.stderr
    proc = _export(f"ckpt={tmp_path / 'missing.ckpt'}")
    assert proc.returncode == 2 and "checkpoint not found" in proc.stderr
    assert not list(tmp_path.glob("**/*_teacher.pth"))


def test_export_full_dino_checkpoint_of_a_timm_backbone(tmp_path):
    torch.manual_seed(0)
    model = DINOModule({"name": "timm", "timm_name": "test_resnet", "drop_path_rate": 0.0}, tiny_dino(), batch_size=2)
    run_config = {"dataset": {"name": "demo"}, "backbone": {"name": "timm", "timm_name": "test_resnet"}}
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[TeacherExport(tmp_path / "export", "demo", run_config)],
    )
    trainer.fit(model, train_dataloaders=crop_batches(1, batch_size=2))
    full = tmp_path / "export" / "demo_test_resnet_epoch0001_checkpoint.pth"
    proc = _export(f"ckpt={full}", f"output={tmp_path / 'again'}")
    assert proc.returncode == 0, proc.stderr
    again = torch.load(tmp_path / "again" / "demo_test_resnet_epoch0001_teacher.pth", weights_only=True)
    assert again.keys() == model.teacher.backbone.state_dict().keys()
    assert all(torch.equal(v, model.teacher.backbone.state_dict()[k]) for k, v in again.items())
    assert _export("--help").returncode == 0

"""Continue pretraining from weights (backbone.init_weights): every file format, head + center, mismatches,
the frozen-backbone warm-up and a resumed run that keeps its checkpoint state (tiny timm backbone, real Trainer)."""

from __future__ import annotations

import logging

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import save_file

from support.tiny_training import TINY_BACKBONE, crop_batches, tiny_dino
from surgenet_ssl.backbones import timm_to_surgenet
from surgenet_ssl.training.init_weights import dino_head_and_center, initialize_dino
from surgenet_ssl.training.module import DINOModule
from surgenet_ssl.training.teacher_export import export_checkpoint


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def _source_module(seed: int = 1) -> DINOModule:
    """A 'previous run': random weights different from a fresh module's, a non-zero center, distinct student."""
    torch.manual_seed(seed)
    m = DINOModule(TINY_BACKBONE, tiny_dino(), batch_size=4)
    with torch.no_grad():
        for p in m.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
        m.dino_loss.center.normal_()
    return m


def _fresh(**backbone) -> DINOModule:
    torch.manual_seed(0)
    return DINOModule({**TINY_BACKBONE, **backbone}, tiny_dino(), batch_size=4)


def _lightning_checkpoint(m: DINOModule) -> dict:
    return {
        "state_dict": m.state_dict(),
        "global_step": 7,
        "pytorch-lightning_version": pl.__version__,
        "hyper_parameters": {"backbone": dict(TINY_BACKBONE), "dino": tiny_dino(), "batch_size": 4},
    }


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fmt", ["safetensors", "lightning", "dino_export"])
def test_every_format_starts_student_and_teacher_from_the_file_teacher(tmp_path, fmt, caplog):
    src = _source_module()
    want_backbone, want_head = src.teacher.backbone.state_dict(), src.teacher.head.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "teacher.safetensors"
        save_file({k: v.contiguous() for k, v in want_backbone.items()}, str(path))
    elif fmt == "lightning":
        path = tmp_path / "other_run.ckpt"
        torch.save(_lightning_checkpoint(src), path)
    else:  # our full DINO checkpoint export (official DINO layout: student/teacher/dino_loss.center)
        path = export_checkpoint(_lightning_checkpoint(src), tmp_path / "export", dataset="x")["checkpoint"]
    m = _fresh()
    fresh_head = {k: v.clone() for k, v in m.student.head.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="surgenet_ssl"):
        report = initialize_dino(m.student, m.teacher, path, "timm", center=m.dino_loss.center)
    assert report.backbone.loaded == len(want_backbone) and not report.backbone.missing
    assert _same(m.student.backbone.state_dict(), want_backbone)
    assert _same(m.teacher.backbone.state_dict(), want_backbone)
    if fmt == "safetensors":  # a bare backbone: the head and center stay fresh
        assert report.head_tensors == 0 and not report.center
        assert _same(m.student.head.state_dict(), fresh_head) and m.dino_loss.center.abs().sum() == 0
    else:  # head and center come along: the file's *teacher* head into both
        assert report.head_tensors == len(want_head) and report.center
        assert _same(m.student.head.state_dict(), want_head) and _same(m.teacher.head.state_dict(), want_head)
        assert torch.equal(m.dino_loss.center, src.dino_loss.center)
    line = [r.getMessage() for r in caplog.records if "init_weights:" in r.getMessage()]
    assert line and f"{len(want_backbone)} backbone tensors" in line[0]


def test_official_dino_layout_with_ddp_prefixed_student(tmp_path):
    src = _source_module()
    teacher = {f"backbone.{k}": v for k, v in src.teacher.backbone.state_dict().items()}
    teacher.update({f"head.{k}": v for k, v in src.teacher.head.state_dict().items()})
    student = {f"module.{k}": v for k, v in src.student.state_dict().items()}
    torch.save(
        {"student": student, "teacher": teacher, "epoch": 100, "dino_loss": {"center": src.dino_loss.center}},
        tmp_path / "checkpoint.pth",
    )
    head, center, kind = dino_head_and_center(torch.load(tmp_path / "checkpoint.pth", weights_only=True))
    assert kind == "full DINO checkpoint" and _same(head, src.teacher.head.state_dict())
    m = _fresh()
    initialize_dino(m.student, m.teacher, tmp_path / "checkpoint.pth", "timm", center=m.dino_loss.center)
    assert _same(m.teacher.state_dict(), src.teacher.state_dict())
    assert torch.equal(m.dino_loss.center, src.dino_loss.center)


def test_published_surgenet_naming_loads_into_caformer(tmp_path):
    from types import SimpleNamespace

    from surgenet_ssl.backbones import build_backbone

    torch.manual_seed(3)
    student = SimpleNamespace(backbone=build_backbone("caformer_s18", drop_path_rate=0.1), head=None)
    teacher = SimpleNamespace(backbone=build_backbone("caformer_s18"), head=None)
    source = {k: v + 0.01 for k, v in student.backbone.state_dict().items()}  # other weights, SurgeNet-named below
    torch.save(timm_to_surgenet(source, "caformer_s18"), tmp_path / "surgenet_caformer_teacher.pth")
    report = initialize_dino(student, teacher, tmp_path / "surgenet_caformer_teacher.pth", "caformer_s18")
    assert report.backbone.loaded == 152 and "surgenet naming" in report.backbone.format
    assert _same(student.backbone.state_dict(), source) and _same(teacher.backbone.state_dict(), source)


def test_mismatches_are_errors_and_init_head_false_keeps_a_fresh_head(tmp_path):
    src = _source_module()
    torch.save(_lightning_checkpoint(src), tmp_path / "run.ckpt")
    # another backbone: the loader names the tensors
    m = DINOModule({"name": "timm", "timm_name": "test_vit", "drop_path_rate": 0.0}, tiny_dino(), batch_size=4)
    with pytest.raises(ValueError, match="does not match|wrong shape"):
        initialize_dino(m.student, m.teacher, tmp_path / "run.ckpt", "timm")
    # another head (out_dim 64 vs the file's 32): error with the fix
    other = DINOModule(TINY_BACKBONE, tiny_dino(out_dim=64), batch_size=4)
    with pytest.raises(ValueError, match="init_head=false"):
        initialize_dino(other.student, other.teacher, tmp_path / "run.ckpt", "timm", center=other.dino_loss.center)
    fresh_head = {k: v.clone() for k, v in other.student.head.state_dict().items()}
    report = initialize_dino(
        other.student, other.teacher, tmp_path / "run.ckpt", "timm", center=other.dino_loss.center, load_head=False
    )
    assert report.head_tensors == 0 and _same(other.student.head.state_dict(), fresh_head)
    assert _same(other.teacher.backbone.state_dict(), src.teacher.backbone.state_dict())


def test_fit_applies_init_weights_and_keeps_the_backbone_frozen_for_k_epochs(tmp_path):
    src = _source_module()
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in src.teacher.backbone.state_dict().items()}, str(path))
    loaded = src.teacher.backbone.state_dict()

    frozen = _fresh(init_weights=str(path), freeze_epochs=1)
    head_before = frozen.student.head.mlp[0].weight.detach().clone()
    _trainer(tmp_path, max_epochs=1).fit(frozen, train_dataloaders=crop_batches(3, batch_size=4))
    # epoch 0 frozen: AdamW skipped the backbone's parameters (BatchNorm running statistics still update)
    params = dict(frozen.student.backbone.named_parameters())
    assert params and all(torch.equal(v, loaded[k]) for k, v in params.items())
    teacher = dict(frozen.teacher.backbone.named_parameters())
    assert all(torch.allclose(v, loaded[k], atol=1e-6) for k, v in teacher.items())
    assert not torch.equal(frozen.student.head.mlp[0].weight, head_before)  # the head trains

    free = _fresh(init_weights=str(path), freeze_epochs=0)
    _trainer(tmp_path, max_epochs=1).fit(free, train_dataloaders=crop_batches(3, batch_size=4))
    moved = [k for k, v in free.student.backbone.named_parameters() if not torch.equal(v, loaded[k])]
    assert moved  # started from the file (checked above) and trained


def test_resumed_run_keeps_its_checkpoint_and_never_reads_init_weights(tmp_path):
    first = _fresh()
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(first, train_dataloaders=crop_batches(2, batch_size=4))
    ckpt = tmp_path / "run" / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = {k: v.clone() for k, v in first.state_dict().items()}

    # the same run rerun with init_weights set to a file that does not exist: a read would raise
    resumed = _fresh(init_weights=str(tmp_path / "gone.pth"))
    _trainer(tmp_path, max_epochs=1).fit(resumed, train_dataloaders=crop_batches(2, batch_size=4), ckpt_path=ckpt)
    assert _same(resumed.state_dict(), saved)
    with pytest.raises(FileNotFoundError):  # and the same module on a fresh run does read it
        _trainer(tmp_path, max_epochs=1).fit(
            _fresh(init_weights=str(tmp_path / "gone.pth")), train_dataloaders=crop_batches(2, batch_size=4)
        )

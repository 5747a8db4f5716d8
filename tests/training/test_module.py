"""The LightningModule in a real Lightning Trainer on CPU with a tiny backbone."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

import surgenet_ssl.training.module as module_lib
from support.tiny_training import TINY_BACKBONE, crop_batches, tiny_dino
from surgenet_ssl.dino import DINOLoss
from surgenet_ssl.training.module import DINOModule


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


def test_ema_and_center_update_once_per_optimizer_step_with_accumulation(tmp_path, monkeypatch):
    ema_calls, center_calls = [], []
    real_update = module_lib.update_teacher
    monkeypatch.setattr(module_lib, "update_teacher", lambda s, t, m: (ema_calls.append(m), real_update(s, t, m)))
    real_center = DINOLoss.update_center
    monkeypatch.setattr(DINOLoss, "update_center", lambda self: (center_calls.append(1), real_center(self)))

    model = DINOModule(TINY_BACKBONE, tiny_dino(), batch_size=4)
    trainer = _trainer(tmp_path, accumulate_grad_batches=2)
    trainer.fit(model, train_dataloaders=crop_batches(6, batch_size=4))
    assert trainer.global_step == 3
    assert len(ema_calls) == 3 and len(center_calls) == 3
    # Momentum follows the cosine schedule over the 3 optimizer steps: 0.996 -> ... (index by optimizer step).
    assert ema_calls == pytest.approx(model.schedules["momentum"][:3].tolist())
    assert model.global_batch == 8  # 4 per device x 1 device x 2 accumulation


def test_teacher_gets_no_gradient_and_moves_by_ema(tmp_path):
    model = DINOModule(TINY_BACKBONE, tiny_dino(), batch_size=4)
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student_last = model.student.head.last_layer.weight_v.detach().clone()
    _trainer(tmp_path).fit(model, train_dataloaders=crop_batches(3, batch_size=4))
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    moved = [k for k, v in model.teacher.state_dict().items() if not torch.equal(v, before[k])]
    assert any("backbone" in k for k in moved)
    # The last layer stays frozen in the first epoch (freeze_last_layer=1): AdamW skips it (no weight decay
    # either), and the teacher's EMA of an unchanged layer stays put (up to float rounding).
    assert torch.equal(model.student.head.last_layer.weight_v, student_last)
    assert torch.allclose(model.teacher.head.last_layer.weight_v, before["head.last_layer.weight_v"], atol=1e-7)
    assert not torch.equal(model.student.head.mlp[0].weight, before["head.mlp.0.weight"])
    assert model.dino_loss.center.abs().sum() > 0


def test_lr_warmup_and_weight_decay_applied_per_step(tmp_path):
    model = DINOModule(TINY_BACKBONE, tiny_dino(), batch_size=4)
    seen = []

    class Spy(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(
                (
                    optimizer.param_groups[0]["lr"],
                    optimizer.param_groups[0]["weight_decay"],
                    optimizer.param_groups[1]["weight_decay"],
                )
            )

    _trainer(tmp_path, max_epochs=2, callbacks=[Spy()]).fit(model, train_dataloaders=crop_batches(4, batch_size=4))
    peak = 5e-4 * 4 / 256
    lrs = [s[0] for s in seen]
    assert lrs[:4] == pytest.approx([0.0, peak / 3, 2 * peak / 3, peak])  # 1 warmup epoch of 4 steps
    assert seen[0][1] == pytest.approx(0.04) and seen[-1][1] > 0.04
    assert all(s[2] == 0.0 for s in seen)  # biases and norms: no weight decay


def test_non_finite_loss_stops_with_step_in_message_and_keeps_last_good_checkpoint(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    model = DINOModule(TINY_BACKBONE, tiny_dino(), batch_size=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=-1)
    trainer = _trainer(tmp_path, enable_checkpointing=True, callbacks=[ckpt])
    with pytest.raises(FloatingPointError, match="optimizer step 2"):
        trainer.fit(model, train_dataloaders=crop_batches(4, batch_size=4, nan_at=2))
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 2  # the two good steps; nothing written for the diverged one
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert not list((tmp_path / "ckpt").glob("*.tmp"))


def test_resume_with_another_backbone_is_refused(tmp_path):
    model = DINOModule(TINY_BACKBONE, tiny_dino(), batch_size=4)
    trainer = _trainer(tmp_path)
    trainer.fit(model, train_dataloaders=crop_batches(2, batch_size=4))
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    other = DINOModule({**TINY_BACKBONE, "timm_name": "test_byobnet"}, tiny_dino(), batch_size=4)
    with pytest.raises(ValueError, match="backbone.timm_name"):
        _trainer(tmp_path, max_epochs=2).fit(other, train_dataloaders=crop_batches(2, batch_size=4), ckpt_path=ckpt)

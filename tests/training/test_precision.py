"""16-mixed: the gradient scaler unscales before DINO's per-parameter clipping and skips overflow steps.

Lightning refuses fp16 autocast on CPU by name, so the tests pass its MixedPrecision plugin with a CPU GradScaler:
the same code path as `trainer.precision=16-mixed` on a GPU.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision

from support.tiny_training import crop_batches, tiny_dino
from surgenet_ssl.training.module import DINOModule

BACKBONE = {"name": "timm", "timm_name": "test_vit", "drop_path_rate": 0.0}


class Recorder(DINOModule):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.before, self.after = [], []

    def on_before_optimizer_step(self, optimizer) -> None:
        norms = lambda: {n: p.grad.norm().item() for n, p in self.student.named_parameters() if p.grad is not None}  # noqa: E731
        self.before.append(norms())
        super().on_before_optimizer_step(optimizer)
        self.after.append(norms())


def _fit(model: DINOModule, batches: int, scaler: torch.amp.GradScaler | None = None) -> pl.Trainer:
    plugins = [MixedPrecision("16-mixed", "cpu", scaler=scaler)] if scaler is not None else []
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        plugins=plugins,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=crop_batches(batches, batch_size=4))
    return trainer


def _dino(clip: float) -> dict:
    dino = tiny_dino()
    dino["optimizer"].update(clip_grad=clip, freeze_last_layer=0, warmup_epochs=0)
    return dino


def test_fp16_clipping_sees_unscaled_gradients():
    torch.manual_seed(0)
    fp32 = Recorder(BACKBONE, _dino(clip=0.0), batch_size=4)
    _fit(fp32, batches=1)
    torch.manual_seed(0)
    fp16 = Recorder(BACKBONE, _dino(clip=1e-3), batch_size=4)
    _fit(fp16, batches=1, scaler=torch.amp.GradScaler("cpu", init_scale=8.0))
    ref, got = fp32.before[0], fp16.before[0]
    assert ref.keys() == got.keys()
    big = [n for n in ref if ref[n] > 1e-4]
    ratios = torch.tensor([got[n] / ref[n] for n in big])
    # Unscaled: the same magnitude as fp32 up to fp16 rounding (a scaled gradient would be 8x larger).
    assert len(big) > 5 and 0.8 < ratios.median() < 1.25
    # Per-parameter clipping applied after unscaling: every parameter's gradient norm is at most the threshold.
    assert max(fp16.after[0].values()) <= 1e-3 * (1 + 1e-4)


def test_fp16_overflow_step_is_skipped():
    torch.manual_seed(0)
    model = DINOModule(BACKBONE, _dino(clip=3.0), batch_size=4)
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # the scaled fp16 backward overflows
    trainer = _fit(model, batches=1, scaler=scaler)
    assert scaler.get_scale() < 2.0**40  # the scaler saw inf/nan and backed off
    assert trainer.global_step == 1
    for key, value in model.student.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed although the overflow step must be skipped"

"""Warmup and cosine lengths follow the steps the Trainer really runs (official DINO asserts its schedule length):
``limit_train_batches`` shortens every epoch, ``max_steps`` the run."""

from __future__ import annotations

import logging

import pytest
import pytorch_lightning as pl
import torch

from support.tiny_training import TINY_BACKBONE, crop_batches, tiny_dino
from surgenet_ssl.dino.schedules import cosine_schedule, scaled_lr
from surgenet_ssl.training.module import DINOModule


class LrRecorder(pl.Callback):
    def __init__(self) -> None:
        self.lr: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.lr.append(trainer.optimizers[0].param_groups[0]["lr"])


def _fit(**trainer_kwargs) -> tuple[list[float], DINOModule]:  # noqa: ANN003
    torch.manual_seed(0)
    dino = tiny_dino()
    model = DINOModule(TINY_BACKBONE, dino, batch_size=2, diagnostics_every_n_steps=0)
    recorder = LrRecorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
        **trainer_kwargs,
    )
    trainer.fit(model, train_dataloaders=crop_batches(10, batch_size=2))
    return recorder.lr, model


def test_limit_train_batches_sets_the_epoch_length_of_the_schedules() -> None:
    lr, model = _fit(max_epochs=5, limit_train_batches=2)  # 2 of 10 batches per epoch: 10 steps, warmup 1 epoch
    peak = scaled_lr(5e-4, 2)
    expected = cosine_schedule(peak, 1e-6, 10, warmup_steps=2).tolist()  # not 10 warmup steps of a 50-step run
    assert lr == pytest.approx(expected, rel=1e-9)
    assert max(lr) == pytest.approx(peak) and lr.index(max(lr)) == 1  # it rises for one epoch (2 steps)...
    assert lr[-1] < 1e-6 + (peak - 1e-6) * 0.05  # ... then decays to the end of the run
    assert model.steps_per_epoch == 2


def test_max_steps_ends_the_cosine_and_a_too_long_warmup_is_said(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        _fit(max_epochs=1, limit_train_batches=4)  # warmup_epochs=1 = the whole run: it reaches its peak
        assert "longer than the whole run" not in caplog.text
        lr, _ = _fit(max_epochs=5, max_steps=6)  # 6 steps of a 50-step plan: the 10-step warmup never ends
    assert lr == pytest.approx(cosine_schedule(scaled_lr(5e-4, 2), 1e-6, 6, warmup_steps=10).tolist(), rel=1e-9)
    assert "the lr warmup (dino.optimizer.warmup_epochs: 10 optimizer steps of 10 per epoch) is longer than the " in (
        caplog.text
    )

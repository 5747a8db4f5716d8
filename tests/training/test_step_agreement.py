"""The per-step agreement on "loss not finite" / "preempted": immediate on CPU, one step late when pipelined (CUDA),
and always settled before a checkpoint is written."""

from __future__ import annotations

import math

import pytest
import torch

from support.tiny_training import TINY_BACKBONE, crop_batches, tiny_dino
from surgenet_ssl.runtime.step_agreement import StepAgreement
from surgenet_ssl.training.module import DINOModule

CPU = torch.device("cpu")


def test_immediate_agreement_reports_the_step_it_happened_at():
    agreement = StepAgreement(pipelined=False)
    agreement.record_loss(torch.tensor(1.0), (0, 0, 0))
    first = agreement.submit(False, (0, 0, 0), CPU)
    assert first is not None and not first.any_bad and not first.stop
    agreement.record_loss(torch.tensor(2.0), (1, 0, 2))
    agreement.record_loss(torch.tensor(math.nan), (1, 0, 3))  # second micro-batch of the step
    bad = agreement.submit(True, (1, 0, 2), CPU)
    assert bad.any_bad and bad.stop and bad.where == (1, 0, 2) and bad.local_loss == "nan"
    assert "DINO loss is nan at optimizer step 1 (epoch 0, batch 2)" in bad.message()


def test_pipelined_agreement_is_read_one_step_later_or_when_resolved():
    agreement = StepAgreement(pipelined=True)
    agreement.record_loss(torch.tensor(1.0), (0, 0, 0))
    assert agreement.submit(False, (0, 0, 0), CPU) is None  # nothing to read yet: no wait in step 0
    agreement.record_loss(torch.tensor(math.inf), (1, 0, 1))
    step0 = agreement.submit(False, (1, 0, 1), CPU)
    assert step0 is not None and not step0.any_bad and step0.where == (0, 0, 0)
    pending = agreement.resolve()  # before a checkpoint: step 1 is read at once
    assert pending.any_bad and pending.where == (1, 0, 1) and pending.local_loss == "inf"
    assert agreement.resolve() is None


def test_pipelined_module_still_never_checkpoints_a_non_finite_step(tmp_path):
    """With the CUDA behaviour forced on CPU, the bad step's update is applied, but the checkpoint about to hold it
    is refused, and the last checkpoint is the last good step (as without pipelining)."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    model = DINOModule(TINY_BACKBONE, tiny_dino(), batch_size=4)
    model._agreement = StepAgreement(pipelined=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=-1)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ckpt],
        default_root_dir=tmp_path,
    )
    with pytest.raises(FloatingPointError, match="optimizer step 2"):
        trainer.fit(model, train_dataloaders=crop_batches(4, batch_size=4, nan_at=2))
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())

"""The online k-NN monitor measures the untrained teacher at step 0 (fresh runs only) and ends with
"k-NN top-1: <baseline> at init -> <final> after N steps"."""

from __future__ import annotations

import logging

import pytest
import pytorch_lightning as pl
import torch

from evaluation.helpers import make_image_folder
from support.tiny_training import TINY_BACKBONE, crop_batches, tiny_dino
from surgenet_ssl.callbacks import KNNMonitor
from surgenet_ssl.training.module import DINOModule


class _Recorder(pl.loggers.Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    name, version = "recorder", "0"

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def _folder_monitor(tmp_path) -> KNNMonitor:
    """A monitor on two small labelled image folders (3 classes; 12 memory / 6 query images)."""
    make_image_folder(tmp_path / "train", 4)
    make_image_folder(tmp_path / "val", 2, seed=1)
    return KNNMonitor(
        every_n_epochs=1,
        k=3,
        image_size=32,
        train_dir=str(tmp_path / "train"),
        val_dir=str(tmp_path / "val"),
        embedding_map=False,
    )


def test_step_zero_baseline_and_final_line(tmp_path, caplog):
    monitor = _folder_monitor(tmp_path)
    recorder = _Recorder()
    torch.manual_seed(0)
    module = DINOModule(TINY_BACKBONE, tiny_dino(), batch_size=4, diagnostics_every_n_steps=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=recorder,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with caplog.at_level(logging.INFO, logger="surgenet_ssl"):
        trainer.fit(module, train_dataloaders=crop_batches(2, batch_size=4))
    knn = [(step, m["knn/top1"]) for step, m in recorder.rows if "knn/top1" in m]
    assert [s for s, _ in knn] == [0, 2, 4]  # step 0 (untrained), then after each epoch
    assert monitor.baseline_result["knn/top1"] == knn[0][1] and monitor.last_result["knn/top1"] == knn[-1][1]
    assert f"k-NN top-1: {knn[0][1]:.4f} at init -> {knn[-1][1]:.4f} after 4 steps" in caplog.text
    assert "step 0 (untrained teacher): k-NN top-1" in caplog.text
    # test_resnet has BatchNorm: the untrained teacher is scored with statistics estimated on the memory images
    assert "BatchNorm layer(s) of the teacher never saw data" in caplog.text
    ranks = [m["knn/feature_rank"] for _, m in recorder.rows if "knn/feature_rank" in m]
    assert len(ranks) == 3 and all(1.0 <= r <= 12 for r in ranks)  # at most min(memory images - 1, dim)
    assert f"teacher feature rank (RankMe): {ranks[0]:.1f} at init -> {ranks[-1]:.1f} after 4 steps" in caplog.text

    # the baseline travels in checkpoints; a resumed run (global step > 0) does not measure it again
    state = monitor.state_dict()
    again = KNNMonitor(every_n_epochs=1)
    again.load_state_dict(state)
    assert again.baseline_result == monitor.baseline_result
    off = KNNMonitor(
        every_n_epochs=1,
        baseline=False,
        train_dir=str(tmp_path / "train"),
        val_dir=str(tmp_path / "val"),
        image_size=32,
        embedding_map=False,
    )
    rec2 = _Recorder()
    pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=rec2,
        callbacks=[off],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    ).fit(
        DINOModule(TINY_BACKBONE, tiny_dino(), batch_size=4, diagnostics_every_n_steps=0),
        train_dataloaders=crop_batches(2, batch_size=4),
    )
    assert [s for s, m in rec2.rows if "knn/top1" in m] == [2]


class _Collapsed(torch.nn.Module):
    """A 'teacher backbone' whose features all lie on one line: dimensional collapse."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))[:, None] * torch.ones(1, 16)


def test_feature_rank_is_logged_and_its_collapse_warned(tmp_path, caplog):
    from types import SimpleNamespace

    monitor = _folder_monitor(tmp_path)
    recorder = _Recorder()
    trainer = SimpleNamespace(loggers=[recorder], global_step=8, is_global_zero=True, default_root_dir=tmp_path)
    module = torch.nn.Module()
    module.teacher = torch.nn.Module()
    module.teacher.backbone = _Collapsed()
    module.device = torch.device("cpu")
    monitor.baseline_result = {"knn/top1": 0.5, "knn/top5": 1.0, "knn/feature_rank": 20.0}
    with caplog.at_level(logging.INFO, logger="surgenet_ssl"):
        monitor._evaluate(trainer, module, 2)
    assert recorder.rows[-1][1]["knn/feature_rank"] == pytest.approx(1.0)
    assert "epoch 2: k-NN top-1" in caplog.text and "feature rank 1.0" in caplog.text
    assert "dimensional collapse suspected" in caplog.text and "down from 20.0 at init" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="surgenet_ssl"):
        monitor._evaluate(trainer, module, 3)
    assert "feature rank 1.0" in caplog.text and "dimensional collapse" not in caplog.text  # warned once per run

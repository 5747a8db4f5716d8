"""Checkpoint callbacks: the rolling newest checkpoint, and numbered ones kept for good every N epochs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class ArchiveCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint whose state key cannot collide with the main checkpoint callback's.

    Lightning keys callback state by (monitor, mode, intervals); an archive every epoch would otherwise share the
    key of the per-epoch checkpointer and the Trainer refuses to start.
    """

    @property
    def state_key(self) -> str:
        return f"ArchiveCheckpoint{{'dirpath': {str(self.dirpath)!r}}}"  # public attributes only


class RollingCheckpoint(ModelCheckpoint):
    """The rolling newest-checkpoint callback. Unlike Lightning's, it also removes the checkpoint a run resumed from
    once a newer one of its own is written (Lightning keeps that file), so a job requeued many times does not pile
    up one stale checkpoint per requeue. Only files in its own ``dirpath`` with ``save_top_k=1`` are pruned."""

    def _prune_resumed(self, trainer: pl.Trainer) -> None:
        resumed = trainer.ckpt_path
        if not resumed or self.save_top_k != 1 or not self.best_model_path or not trainer.is_global_zero:
            return
        resumed_path, current = Path(resumed).resolve(), Path(self.best_model_path).resolve()
        if current == resumed_path or not current.is_file() or self.dirpath is None:
            return
        if resumed_path.parent != Path(self.dirpath).resolve():
            return
        if resumed_path.is_file():
            resumed_path.unlink()
            log.info("removed %s (superseded by %s)", resumed_path.name, current.name)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        self._prune_resumed(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._prune_resumed(trainer)

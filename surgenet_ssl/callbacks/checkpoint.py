"""Checkpoint callbacks: the rolling newest checkpoint, and numbered ones kept for good every N epochs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from surgenet_ssl.runtime.checkpointing import PREEMPTION_PREFIX, link_atomically, remove_checkpoint_file

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
    """The rolling newest-checkpoint callback (one for epoch checkpoints, one for step checkpoints). Unlike
    Lightning's ModelCheckpoint:

    - with ``save_last="link"``, ``last.ckpt`` is pointed (one atomic rename) at every file this callback writes,
      when it is written. With the epoch and the step checkpointer both linking, ``last.ckpt`` is always the newest
      checkpoint of any kind; Lightning links only its own callback's files and re-links ``last.ckpt`` at every
      epoch end to that callback's newest, which may be older than a step checkpoint.
    - it also removes the checkpoint a run resumed from (Lightning keeps that file), so a job requeued many times
      does not pile up one stale checkpoint per requeue: once this callback has written one at a later step, and
      only if the file was its own (its previous one) or a preemption checkpoint. An older file never supersedes a
      newer one, and the step checkpointer leaves a resumed epoch checkpoint to the epoch checkpointer: it stays
      the fallback if the newest file turns out damaged at the next start.

    Only files in its own ``dirpath`` with ``save_top_k=1`` are pruned."""

    _resumed_step = 0
    _saved_step: int | None = None
    _prunes_resumed = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._resumed_step, self._saved_step = trainer.global_step, None
        resumed = Path(trainer.ckpt_path).resolve() if trainer.ckpt_path else None
        own_previous = Path(self.best_model_path).resolve() if self.best_model_path else None
        self._prunes_resumed = resumed is not None and (
            resumed == own_previous or resumed.name.startswith(PREEMPTION_PREFIX)
        )

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._saved_step = trainer.global_step
        if self._links_last and trainer.is_global_zero and self.dirpath is not None:
            last = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
            link_atomically(Path(filepath), last)
            self.last_model_path = str(last)

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        if not self._links_last:  # save_last=True: Lightning's copy
            super()._save_last_checkpoint(trainer, monitor_candidates)

    @property
    def _links_last(self) -> bool:
        return self.save_last == "link" and self.save_top_k != 0

    def _prune_resumed(self, trainer: pl.Trainer) -> None:
        resumed = trainer.ckpt_path
        if not resumed or self.save_top_k != 1 or not self.best_model_path or not trainer.is_global_zero:
            return
        if not self._prunes_resumed or self._saved_step is None or self._saved_step <= self._resumed_step:
            return  # not ours to prune, or nothing newer of ours yet
        resumed_path, current = Path(resumed).resolve(), Path(self.best_model_path).resolve()
        if current == resumed_path or not current.is_file() or self.dirpath is None:
            return
        if resumed_path.parent != Path(self.dirpath).resolve():
            return
        if resumed_path.is_file():
            remove_checkpoint_file(resumed_path)
            log.info("removed %s (superseded by %s)", resumed_path.name, current.name)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        self._prune_resumed(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._prune_resumed(trainer)

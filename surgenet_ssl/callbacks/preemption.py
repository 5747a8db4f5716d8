"""Save one checkpoint and stop when the ranks have agreed that the job is being preempted.

The signal handler only sets a flag (surgenet_ssl.runtime.cluster); ``DINOModule.on_before_optimizer_step``
all-reduces it with the non-finite-loss flag, once per optimizer step, so every rank sees the same decision at the
same step. Here, at the end of that step, all ranks save the checkpoint together (normal code, not a signal handler)
and training stops with :class:`TrainingPreempted`; the entry point then requeues the job (rank 0).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl

from surgenet_ssl.runtime.checkpointing import PREEMPTION_PREFIX, link_atomically, remove_checkpoint_file
from surgenet_ssl.runtime.cluster import TrainingPreempted

__all__ = ["PreemptionCheckpoint", "TrainingPreempted"]

log = logging.getLogger(__name__)


class PreemptionCheckpoint(pl.Callback):
    """Writes ``<dirpath>/preempted-step<N>.ckpt`` (only the newest is kept), points ``last.ckpt`` at it, stops."""

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if not getattr(pl_module, "stop_agreed", False):
            return
        step = trainer.global_step
        path = self.dirpath / f"{PREEMPTION_PREFIX}{step:08d}.ckpt"
        trainer.save_checkpoint(path)  # every rank takes part; rank 0 writes
        if trainer.is_global_zero:
            for old in self.dirpath.glob(f"{PREEMPTION_PREFIX}*.ckpt"):
                if old != path:
                    remove_checkpoint_file(old)
            link_atomically(path, self.dirpath / "last.ckpt")
            log.warning("preemption signal: checkpoint written at optimizer step %d: %s", step, path)
        raise TrainingPreempted(step, path)

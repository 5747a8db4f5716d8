"""The progress bar and the rule of the logging steps: the only steps of training that read values on the host.

Why: Lightning converts every ``prog_bar=True`` metric with ``.item()`` after every batch, and the default bar
refreshes after every batch: a host sync per step that stalls the GPU queue. So the loss is logged without
``prog_bar`` and this bar shows it, read from ``callback_metrics``, on the steps whose metrics Lightning writes out
anyway (``trainer.log_every_n_steps``) and at the end of an epoch.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar

SHOWN = ("train/loss",)  # device tensors logged without prog_bar, shown by the bar when it refreshes


def logs_written_now(trainer: pl.Trainer, batch_idx: int) -> bool:
    """In ``on_train_batch_end``: whether Lightning writes this step's metrics (after an optimizer step whose count
    is a multiple of ``log_every_n_steps``; the module's ``_is_log_step`` is the same rule before the step)."""
    every = int(trainer.log_every_n_steps)  # type: ignore[attr-defined]  # set by Lightning's connectors
    stepped = (batch_idx + 1) % max(1, trainer.accumulate_grad_batches) == 0
    return every > 0 and stepped and trainer.global_step > 0 and trainer.global_step % every == 0


class LoggingStepProgressBar(TQDMProgressBar):
    """A TQDM bar that advances and shows the metrics on the logging steps and at the end of an epoch only."""

    def __init__(self) -> None:
        super().__init__(refresh_rate=1)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        last = batch_idx + 1 == self.total_train_batches
        if logs_written_now(trainer, batch_idx) or last:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        for key in SHOWN:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                items[key] = f"{float(value):.3f}"  # the host read, on a refresh only
        return items

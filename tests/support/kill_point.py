"""A training callback that stops the process at an exact point, so that a test can SIGKILL it there.

Added on the command line (``+callbacks.hold._target_=support.kill_point.HoldAt ...``, with ``tests/`` on the
subprocess' PYTHONPATH): when ``hook`` runs at optimizer step ``step``, it writes ``marker`` and sleeps until it is
killed. Lightning runs the checkpoint callbacks after all others in a hook, so holding in ``on_train_epoch_end`` is
after the last batch's step checkpoint and before the epoch checkpoint; ``on_train_batch_start`` is after every
checkpoint of the previous step.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

HOOKS = ("on_train_batch_start", "on_train_epoch_end")


class HoldAt(pl.Callback):
    def __init__(self, hook: str, step: int, marker: str) -> None:
        if hook not in HOOKS:
            raise ValueError(f"hook must be one of {HOOKS}, got {hook!r}")
        self.hook, self.step, self.marker = hook, int(step), Path(marker)

    def _hold(self, trainer: pl.Trainer, hook: str) -> None:
        if hook == self.hook and trainer.global_step == self.step:
            self.marker.write_text(f"{hook} at step {self.step}\n")
            while True:  # until SIGKILL
                time.sleep(1)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._hold(trainer, "on_train_batch_start")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._hold(trainer, "on_train_epoch_end")

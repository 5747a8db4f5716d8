"""An audit trail of the data the training loop consumed: which frames, which crops, at which step, on which rank.

Why: "did the resumed run see the same data as an uninterrupted one?" and "which frames went into step N?" are
questions users of a long cluster run ask; the trace answers them from the run dir. Off by default (it copies
the crops to the host to hash them): ``callbacks.batch_trace.enabled=true``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl


class BatchTrace(pl.Callback):
    """Appends one JSON line per consumed batch to ``<output_dir>/rank<r>.jsonl``: global step, epoch, batch index,
    the frame keys and a sha1 of the crops as the model receives them."""

    def __init__(self, output_dir: str | Path, enabled: bool = False) -> None:
        self.output_dir, self.enabled = Path(output_dir), enabled
        self._file: Any = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled or not isinstance(batch, dict):
            return
        if self._file is None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.output_dir / f"rank{trainer.global_rank}.jsonl", "a")
        digest = hashlib.sha1()
        for crop in batch.get("crops", []):
            digest.update(crop.detach().float().cpu().contiguous().numpy().tobytes())
        row = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "batch": batch_idx,
            "keys": list(batch.get("key", [])),
            "crops_sha1": digest.hexdigest(),
        }
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

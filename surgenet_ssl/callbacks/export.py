"""Export the teacher at the end of training (and every N epochs) into ``<run_dir>/export``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl

from surgenet_ssl.export import export_checkpoint, run_provenance

log = logging.getLogger(__name__)


class TeacherExport(pl.Callback):
    """Writes the SurgeNet ``.pth``, timm ``.safetensors`` and full DINO checkpoint from the live training state."""

    def __init__(self, output_dir: str | Path, dataset: str, run_config: dict, every_n_epochs: int = 0,
                 provenance: dict | None = None) -> None:  # fmt: skip
        self.output_dir = Path(output_dir)
        self.dataset = dataset
        self.run_config = run_config
        self.every_n_epochs = every_n_epochs
        self.last_paths: dict[str, Path] = {}
        # command, overrides and git commit of this run, taken where the run starts (the model card records them)
        self.provenance = provenance if provenance is not None else run_provenance()

    def _export(self, trainer: pl.Trainer) -> None:
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        if trainer.is_global_zero:
            self.last_paths = export_checkpoint(checkpoint, self.output_dir, self.dataset, self.run_config)
        trainer.strategy.barrier("teacher_export")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # The composed run config travels with every checkpoint, so `python -m surgenet_ssl.export` can name files.
        checkpoint["run_config"] = self.run_config
        checkpoint["run_provenance"] = self.provenance

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        done = trainer.current_epoch + 1
        if self.every_n_epochs > 0 and done % self.every_n_epochs == 0 and done < (trainer.max_epochs or 0):
            self._export(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._export(trainer)

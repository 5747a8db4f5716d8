"""Export the teacher at the end of training (and every N epochs) into ``<run_dir>/export``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from surgenet_ssl.training.provenance import run_provenance
from surgenet_ssl.training.teacher_export import export_checkpoint

log = logging.getLogger(__name__)


def _curation(trainer: pl.Trainer) -> dict[str, Any]:
    """Each source's curated view summary (``dataset.curated``: thresholds, drop counts, opt-out and leakage lists)
    as the data module read it when it built the loader; empty without curation."""
    datamodule = getattr(trainer, "datamodule", None)
    return dict(getattr(datamodule, "curation", None) or {})


class TeacherExport(pl.Callback):
    """Writes the SurgeNet ``.pth``, timm ``.safetensors`` and full DINO checkpoint from the live training state."""

    def __init__(
        self,
        output_dir: str | Path,
        dataset: str,
        run_config: dict,
        every_n_epochs: int = 0,
        provenance: dict | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.dataset = dataset
        self.run_config = run_config
        self.every_n_epochs = every_n_epochs
        self.last_paths: dict[str, Path] = {}
        # command, overrides and git commit of this run, taken where the run starts (the model card records them)
        self.provenance = provenance if provenance is not None else run_provenance()

    def _snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, completed_epochs: int) -> dict[str, Any]:
        """What the exporters read, from the live training state through Lightning's public API."""
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's connectors, not declared on Trainer
        checkpoint: dict[str, Any] = {
            "state_dict": pl_module.state_dict(),
            "epoch": completed_epochs,
            "global_step": trainer.global_step,
            "hyper_parameters": dict(pl_module.hparams),
            "optimizer_states": [opt.state_dict() for opt in trainer.optimizers],
            "callbacks": {type(cb).__qualname__: cb.state_dict() for cb in callbacks if cb.state_dict()},
            "global_batch": getattr(pl_module, "global_batch", None),
            "progress": getattr(pl_module, "progress_state", dict)(),
            "run_config": self.run_config,
            "run_provenance": self.provenance,
            "data_curation": _curation(trainer),
        }
        precision_state = trainer.precision_plugin.state_dict()
        if precision_state:  # the fp16 gradient scaler
            checkpoint[type(trainer.precision_plugin).__qualname__] = precision_state
        return checkpoint

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, completed_epochs: int) -> None:
        check = getattr(pl_module, "check_pending_steps", None)
        if check is not None:  # never export the weights of a step whose loss was not finite
            check()
        if trainer.is_global_zero:
            checkpoint = self._snapshot(trainer, pl_module, completed_epochs)
            self.last_paths = export_checkpoint(checkpoint, self.output_dir, self.dataset, self.run_config)
        trainer.strategy.barrier("teacher_export")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # The composed run config travels with every checkpoint, so `python -m surgenet_ssl.export` can name files.
        checkpoint["run_config"] = self.run_config
        checkpoint["run_provenance"] = self.provenance
        checkpoint["data_curation"] = _curation(trainer)  # the curated views trained on, for the model card

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        done = trainer.current_epoch + 1
        if self.every_n_epochs > 0 and done % self.every_n_epochs == 0 and done < (trainer.max_epochs or 0):
            self._export(trainer, pl_module, done)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._export(trainer, pl_module, trainer.current_epoch)  # epochs trained (a stopped last epoch counts)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # trainer.max_steps=0 skips the training loop (no on_train_end): export the untrained teacher, the honest
        # random-init (or init_weights) baseline, as epoch 0.
        if trainer.max_steps == 0 and trainer.global_step == 0:
            self._export(trainer, pl_module, 0)

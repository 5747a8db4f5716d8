"""A CSV logger that survives resumes: a rerun in the same run dir appends to ``metrics.csv``; a quiet wandb logger.

Lightning's CSVLogger deletes an existing ``metrics.csv`` when it starts, so every resumed or requeued run (and
every run that stops at start-up, e.g. a refused resume) would lose the log of what came before.
"""

from __future__ import annotations

import csv
from typing import cast

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers import WandbLogger as _LightningWandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment


class AppendingExperimentWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if self._fs.isfile(self.metrics_file_path):  # continue with the columns already in the file
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))

    def _check_log_dir_exists(self) -> None:
        """Keep what is there (the parent deletes metrics.csv here)."""


class ResumableCSVLogger(CSVLogger):
    """``pytorch_lightning.loggers.CSVLogger`` that appends to the metrics of earlier runs in the same directory."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return cast(AppendingExperimentWriter, self._experiment)  # only set here


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger without the ``anonymous=None`` it always hands to ``wandb.init``: recent wandb warns
    about any value ("The anonymous setting has no effect ..."), on every run's console."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)

"""Throughput, data-wait fraction, peak memory and skipped-sample counts, logged every ``log_every_n_steps``.

The data-wait time is the gap between the end of one training batch and the start of the next: that is where the
loop waits for the loader. A wait fraction near 1 means the data pipeline, not the model, limits training.

Logged on the steps whose metrics Lightning writes out (the module's rule, :func:`surgenet_ssl.callbacks.progress.
logs_written_now`), as device tensors made by a fill kernel: ``self.log`` of a Python float would be a blocking
host-to-device copy.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import pytorch_lightning as pl
import torch

from surgenet_ssl.callbacks.progress import logs_written_now


def peak_host_memory_gb() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024**3 if sys.platform == "darwin" else 1024**2)


class ThroughputMonitor(pl.Callback):
    def __init__(self) -> None:
        self._batch_start: float | None = None
        self._last_batch_end: float | None = None
        self._window: dict[str, float] = {"images": 0.0, "step_time": 0.0, "wait_time": 0.0}
        self._fit_start = 0.0
        self._images_total = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_batch_end = None  # the epoch's first wait includes worker start-up; do not count it

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        now = time.perf_counter()
        if self._last_batch_end is not None:
            self._window["wait_time"] += now - self._last_batch_end
            self._window["step_time"] += now - self._last_batch_end
        self._batch_start = now

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self._batch_start is not None:
            self._window["step_time"] += now - self._batch_start
        self._last_batch_end = now
        images = batch["crops"][0].shape[0] if isinstance(batch, dict) else 0
        self._window["images"] += images
        self._images_total += images
        if logs_written_now(trainer, batch_idx):
            self._log(trainer, pl_module)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        w = self._window
        if w["step_time"] <= 0:
            return
        per_device = w["images"] / w["step_time"]
        metrics = {
            "perf/images_per_s_per_device": per_device,
            "perf/images_per_s": per_device * trainer.world_size,
            "perf/data_wait_fraction": w["wait_time"] / w["step_time"],
            "perf/peak_host_memory_gb": peak_host_memory_gb(),
        }
        if pl_module.device.type == "cuda":
            metrics["perf/peak_device_memory_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 1024**3
        stats = getattr(getattr(trainer.train_dataloader, "dataset", None), "stats", None)
        if isinstance(stats, dict):
            for key, value in stats.items():
                if isinstance(value, (int, float)):
                    metrics[f"data/{key}"] = float(value)
        device = pl_module.device
        logged = {k: torch.full((), float(v), device=device) for k, v in metrics.items()}
        pl_module.log_dict(logged, on_step=True, on_epoch=False, batch_size=1)
        self._window = {"images": 0.0, "step_time": 0.0, "wait_time": 0.0}

"""LightningDataModule: builds the streaming loader once the rank and world size are known (after DDP start)."""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from surgenet_ssl.data.augment import FrameResize, MultiCropAugmentation
from surgenet_ssl.data.loader import build_train_loader

log = logging.getLogger(__name__)


def build_augmentation(
    crops: dict, backend: str = "fast", augment_on: str = "cpu", frame_size: Any = (320, 568)
) -> MultiCropAugmentation:
    """The worker transform: the multi-crop augmentation (``augment_on="cpu"``; ``backend`` "fast" or
    "official"), or decode + resize to ``frame_size`` only (``augment_on="gpu"``: DINOModule makes the crops)."""
    if augment_on == "gpu":
        return FrameResize(frame_size=tuple(frame_size), global_crops_size=crops["global_size"])
    if augment_on != "cpu":
        raise ValueError(f"data.augment_on must be 'cpu' or 'gpu', got {augment_on!r}")
    return MultiCropAugmentation(
        global_crops_size=crops["global_size"],
        local_crops_size=crops["local_size"],
        global_crops_scale=crops["global_scale"],
        local_crops_scale=crops["local_scale"],
        local_crops_number=crops["local_number"],
        backend=backend,
    )


class StreamingDataModule(pl.LightningDataModule):
    def __init__(self, dataset: dict, data: dict, crops: dict, data_root: str, seed: int = 0) -> None:
        super().__init__()
        self.dataset_cfg, self.data_cfg, self.crops, self.data_root, self.seed = dataset, data, crops, data_root, seed

    def train_dataloader(self) -> DataLoader[Any]:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        on, backend = self.data_cfg.get("augment_on", "cpu"), self.data_cfg.get("augment_backend", "fast")
        if rank == 0:
            log.info("multi-crop augmentation: %s", "on the training device (GPU mode)" if on == "gpu"
                     else f"in the loader workers, {backend} backend")  # fmt: skip
        return build_train_loader(
            self.dataset_cfg,
            self.data_root,
            transform=build_augmentation(
                self.crops,
                backend=self.data_cfg.get("augment_backend", "fast"),
                augment_on=self.data_cfg.get("augment_on", "cpu"),
                frame_size=self.data_cfg.get("gpu_frame_size", (320, 568)),
            ),
            batch_size=int(self.data_cfg["batch_size"]),
            num_workers=int(self.data_cfg["num_workers"]),
            rank=rank,
            world_size=world,
            seed=self.seed,
            steps_per_epoch=self.data_cfg.get("steps_per_epoch"),
            shuffle_buffer=int(self.data_cfg.get("shuffle_buffer", 1000)),
            # Lightning builds the first iterator before on_train_epoch_start: seed it with the resumed epoch.
            epoch=trainer.current_epoch if trainer is not None else 0,
        )

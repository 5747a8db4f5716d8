"""``python -m surgenet_ssl.train [group=option ...] [key=value ...]``: DINO pretraining.

Thin Hydra entry point: composes ``configs/train.yaml``, builds the LightningModule, data module, callbacks and
loggers from it, resumes from the run dir's newest checkpoint if there is one, trains, exports the teacher and
prints the export directory on the last line.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from surgenet_ssl.callbacks import TeacherExport
from surgenet_ssl.datamodule import StreamingDataModule
from surgenet_ssl.module import DINOModule

log = logging.getLogger("surgenet_ssl.train")


def _container(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a rerun in the same run dir resumes from: ``last.ckpt``, else the newest ``*.ckpt``."""
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if last.is_file():
        return last
    candidates = sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[pl.Callback]:
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    if cfg.export.enabled:
        callbacks.append(
            TeacherExport(run_dir / "export", cfg.dataset.name, _container(cfg), cfg.export.every_n_epochs)
        )
    return callbacks


def build_loggers(cfg: DictConfig) -> list:
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node and "_target_" in node:
            if name == "wandb":
                os.environ.setdefault("WANDB_SILENT", "true")
            loggers.append(hydra.utils.instantiate(node))
    return loggers


def run(cfg: DictConfig) -> Path:
    """Train with a composed config; returns the export directory."""
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    pl.seed_everything(cfg.seed, workers=True)

    module = DINOModule(backbone=_container(cfg.backbone), dino=_container(cfg.dino), batch_size=cfg.data.batch_size)
    datamodule = StreamingDataModule(
        dataset=_container(cfg.dataset),
        data=_container(cfg.data),
        crops=_container(cfg.dino.crops),
        data_root=str(cfg.paths.data_root),
        seed=cfg.seed,
    )
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=build_callbacks(cfg, run_dir), logger=build_loggers(cfg) or False
    )
    ckpt = find_resume_checkpoint(run_dir)
    if ckpt is not None:
        log.info("resuming from %s", ckpt)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    return run_dir / "export"


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        export_dir = run(cfg)
    except FloatingPointError as err:
        log.error("%s", err)
        sys.exit(1)
    print(f"export_dir={export_dir}")


if __name__ == "__main__":
    main()

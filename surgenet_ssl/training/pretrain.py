"""DINO pretraining with a composed ``train`` config (:func:`run_pretraining`), the work of ``python -m
surgenet_ssl.train``: checks the config, takes the run dir, builds the LightningModule, data module, callbacks and
loggers, resumes from the run dir's newest checkpoint if there is one and trains.

Light on import: torch, Lightning, timm and the module/data module/callbacks built on them take seconds to import,
so they are imported inside the functions that use them, and a config mistake fails without paying for them.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, cast

import hydra
from omegaconf import DictConfig, OmegaConf

from surgenet_ssl.data.mixture import check_dataset_config
from surgenet_ssl.runtime.cluster import PREEMPTION, RunDirLock, is_global_rank_zero
from surgenet_ssl.runtime.io_utils import write_text_atomic
from surgenet_ssl.runtime.resources import apply_torch_threads, check_worker_cores
from surgenet_ssl.training.trainer import (
    build_loggers,
    build_plugins,
    build_strategy,
    check_devices,
    is_local_zero,
    silence_benign_warnings,
    trainer_kwargs,
)

if TYPE_CHECKING:
    import pytorch_lightning as pl

log = logging.getLogger("surgenet_ssl.train")  # (the name the training log has always shown)


def _container(node) -> dict:
    """A config group (a DictConfig node) as a plain dict."""
    return cast(dict, OmegaConf.to_container(node, resolve=True)) if node is not None else {}


REQUIRED_HINTS = {
    "backbone.timm_name": "backbone=timm needs the timm model: backbone.timm_name=<name>, e.g. resnet50",
    "dataset.path": "dataset=custom needs the prepared data: dataset.path=DIR (a folder with manifest.json, or "
    "a folder of prepared sources)",
}


def check_required_values(cfg: DictConfig) -> None:
    """Values marked ``???`` in the configs must be given on the command line: say which and how."""
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra"))
    if missing:
        hints = "; ".join(REQUIRED_HINTS.get(k, f"set {k}=...") for k in missing)
        raise ValueError(f"missing required config value(s): {', '.join(missing)}. {hints}")


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[pl.Callback]:
    from surgenet_ssl.callbacks import LoggingStepProgressBar, PreemptionCheckpoint, TeacherExport

    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if not node or "_target_" not in node:
            continue
        if name == "model_checkpoint" and node.get("every_n_train_steps") and node.get("every_n_epochs"):
            # Lightning takes one interval per ModelCheckpoint: split into an epoch and a step checkpointer.
            steps = copy.deepcopy(node)
            steps.every_n_epochs = None  # both link last.ckpt to each file they write: it is always the newest
            steps.filename = "step{step:08d}"
            node = copy.deepcopy(node)
            node.every_n_train_steps = None
            callbacks.append(hydra.utils.instantiate(steps))
        callbacks.append(hydra.utils.instantiate(node))
    callbacks.append(PreemptionCheckpoint(run_dir / "checkpoints"))
    if (cfg.get("trainer") or {}).get("enable_progress_bar", True):
        callbacks.append(LoggingStepProgressBar())  # reads the loss on the logging steps only (no per-step sync)
    if cfg.export.enabled:
        callbacks.append(
            TeacherExport(run_dir / "export", cfg.dataset.name, _container(cfg), cfg.export.every_n_epochs)
        )
    return callbacks


def run_pretraining(cfg: DictConfig) -> tuple[Path, bool]:
    """Train with a composed config; returns the export directory and whether this process is global rank 0.

    Raises :class:`TrainingPreempted` after the preemption checkpoint is written (the caller requeues).
    """
    # First, so that a preemption signal during start-up does not kill the process (the default action).
    PREEMPTION.install(cfg.cluster.preemption_signals)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_required_values(cfg)
    check_dataset_config(_container(cfg.dataset))
    silence_benign_warnings()  # imports Lightning: after the checks above, which do not need it
    kwargs = trainer_kwargs(cfg.trainer)
    check_devices(cfg.trainer)
    rank_zero = is_global_rank_zero()
    lock = RunDirLock(run_dir) if rank_zero and cfg.cluster.lock_run_dir else None
    if lock is not None:
        lock.acquire()  # one training per run dir; released when this process ends, however it ends
        from surgenet_ssl.runtime.checkpointing import remove_partial_saves

        remove_partial_saves(run_dir)  # under the lock, no live process writes them: a killed save's leftovers
    try:
        if rank_zero:
            write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        return _train(cfg, run_dir, kwargs)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: DictConfig, run_dir: Path, kwargs: dict) -> tuple[Path, bool]:
    import pytorch_lightning as pl

    from surgenet_ssl.runtime.checkpointing import checkpoint_step, choose_resume_checkpoint
    from surgenet_ssl.training.datamodule import StreamingDataModule
    from surgenet_ssl.training.module import DINOModule

    pl.seed_everything(cfg.seed, workers=True)
    apply_torch_threads(cfg.data.get("torch_threads"), int(cfg.data.num_workers), cfg.trainer, is_local_zero())
    if is_local_zero():
        check_worker_cores(int(cfg.data.num_workers))  # e.g. srun without --cpus-per-task: one core per task

    module = DINOModule(
        backbone=_container(cfg.backbone),
        dino=_container(cfg.dino),
        batch_size=cfg.data.batch_size,
        diagnostics_every_n_steps=cfg.monitor.diagnostics_every_n_steps,
        performance=_container(cfg.get("performance")),
    )
    datamodule = StreamingDataModule(
        dataset=_container(cfg.dataset),
        data=_container(cfg.data),
        crops=_container(cfg.dino.crops),
        data_root=str(cfg.paths.data_root),
        seed=cfg.seed,
    )
    trainer: pl.Trainer = hydra.utils.instantiate(
        OmegaConf.create({"_target_": cfg.trainer._target_, **kwargs}),
        strategy=build_strategy(cfg),
        callbacks=build_callbacks(cfg, run_dir),
        logger=build_loggers(cfg, run_dir) or False,
        plugins=build_plugins(kwargs.get("plugins")),
    )
    ckpt = choose_resume_checkpoint(run_dir, rank_zero=is_global_rank_zero())
    module.resume_checkpoint = str(ckpt) if ckpt else None  # every rank's choice is compared in module.setup
    if ckpt is not None:
        log.info("resumed from %s at step %d", ckpt, checkpoint_step(ckpt))
    # Checkpoints are data even in the run dir (a shared file system, a copied run): tensors and plain values only,
    # as checkpoint_problem checked before choosing this one.
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
    return run_dir / "export", trainer.is_global_zero

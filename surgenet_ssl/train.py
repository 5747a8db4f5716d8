"""``python -m surgenet_ssl.train [group=option ...] [key=value ...]``: DINO pretraining.

Thin Hydra entry point: composes ``configs/train.yaml``, builds the LightningModule, data module, callbacks and
loggers from it, resumes from the run dir's newest checkpoint if there is one, trains, exports the teacher and
prints the export directory on the last line.
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
import sys
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from surgenet_ssl.callbacks import TeacherExport
from surgenet_ssl.datamodule import StreamingDataModule
from surgenet_ssl.module import DINOModule

log = logging.getLogger("surgenet_ssl.train")

DDP_STRATEGIES = ("ddp", "ddp_spawn", "ddp_find_unused_parameters_true")


def auto_precision() -> str:
    """bf16-mixed where a GPU supports it, else full fp32 (CPU autocast would only slow the demo down)."""
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def sweep_subdir(num: int, task_overrides, sweep_params, override_dirname: str) -> str:
    """Name of a sweep job's dir: ``<n>_<the swept keys=values>`` for grids defined in an ``experiment=`` preset
    (``hydra.sweeper.params``), else ``<n>_<all overrides of the job>``; one path component, at most ~150 chars."""
    keys = set(sweep_params or {})
    swept = [o for o in task_overrides if o.split("=", 1)[0].lstrip("+~") in keys] if keys else []
    name = ",".join(swept) if swept else override_dirname
    name = name.replace("/", "%").replace("\\", "%")  # a path in a value must not create sub-directories
    if len(name) > 150:
        import hashlib

        name = f"{name[:130]}..{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return f"{num}_{name}" if name else str(num)


OmegaConf.register_new_resolver("surgenet.auto_precision", auto_precision, replace=True)
OmegaConf.register_new_resolver("surgenet.sweep_subdir", sweep_subdir, replace=True)


def _container(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a rerun in the same run dir resumes from: the newest of the epoch/step checkpoints
    (``checkpoints/*.ckpt``, ``last.ckpt`` included) and the SLURM preemption checkpoints (``hpc_ckpt_*.ckpt``).

    Checkpoint writes are atomic, so the newest file is always complete.
    """
    candidates = list((run_dir / "checkpoints").glob("*.ckpt")) + list(run_dir.glob("hpc_ckpt_*.ckpt"))
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint was written at (memory-mapped: only the small header is read)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return int(ckpt.get("global_step", 0))


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


def check_devices(trainer_cfg: DictConfig) -> None:
    """Fail at once, with the fix, when the requested GPUs are not there (instead of a hang or a deep error)."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    devices = trainer_cfg.get("devices", "auto")
    if accelerator in ("gpu", "cuda"):
        available = torch.cuda.device_count()
        if available == 0:
            raise ValueError(
                f"trainer.accelerator={accelerator} but no CUDA GPU is visible on this machine. "
                "Use trainer=cpu (or trainer.accelerator=cpu), or check CUDA_VISIBLE_DEVICES / the GPU driver."
            )
        wanted = devices if isinstance(devices, int) else len(devices) if isinstance(devices, (list, tuple)) else None
        if isinstance(devices, str) and devices.isdigit():
            wanted = int(devices)
        if wanted is not None and wanted > available:
            raise ValueError(
                f"trainer.devices={devices} asks for more GPUs than the {available} visible here. "
                f"Use trainer.devices={available} (or -1 for all)."
            )


def _multi_gpu_auto(trainer_cfg: DictConfig) -> bool:
    """True when ``accelerator``/``devices`` left on auto will start several GPU processes on this node."""
    accelerator, devices = str(trainer_cfg.get("accelerator", "auto")), trainer_cfg.get("devices", "auto")
    gpus = torch.cuda.device_count() if accelerator in ("auto", "gpu", "cuda") else 0
    return gpus > 1 and (devices in ("auto", -1, "-1") or (isinstance(devices, int) and devices > 1))


def build_strategy(cfg: DictConfig):
    """``trainer.strategy=ddp`` (a plain string on the command line) -> DDPStrategy with the configured timeout."""
    strategy = cfg.trainer.get("strategy", "auto")
    if strategy == "auto" and _multi_gpu_auto(cfg.trainer):
        strategy = "ddp"  # what Lightning would pick, but with our timeout
    if not isinstance(strategy, str) or strategy not in DDP_STRATEGIES:
        return strategy
    from pytorch_lightning.strategies import DDPStrategy

    timeout = datetime.timedelta(minutes=float(cfg.distributed.timeout_minutes))
    return DDPStrategy(
        start_method="spawn" if strategy == "ddp_spawn" else "popen",
        find_unused_parameters=strategy == "ddp_find_unused_parameters_true",
        process_group_backend=cfg.distributed.get("backend"),
        timeout=timeout,
    )


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[pl.Callback]:
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if not node or "_target_" not in node:
            continue
        if name == "model_checkpoint" and node.get("every_n_train_steps") and node.get("every_n_epochs"):
            # Lightning takes one interval per ModelCheckpoint: split into an epoch and a step checkpointer.
            steps = copy.deepcopy(node)
            steps.every_n_epochs = None
            steps.save_last = False
            steps.filename = "step{step:08d}"
            node = copy.deepcopy(node)
            node.every_n_train_steps = None
            callbacks.append(hydra.utils.instantiate(steps))
        callbacks.append(hydra.utils.instantiate(node))
    if cfg.export.enabled:
        callbacks.append(
            TeacherExport(run_dir / "export", cfg.dataset.name, _container(cfg), cfg.export.every_n_epochs)
        )
    return callbacks


def wandb_run_id(run_dir: Path) -> str:
    """One wandb run id per run dir, so a resumed or requeued run continues the same wandb run."""
    id_file = run_dir / "wandb_run_id.txt"
    if id_file.is_file():
        return id_file.read_text().strip()
    import secrets

    run_id = secrets.token_hex(4)
    id_file.write_text(run_id)
    return run_id


def wandb_offline(node: DictConfig) -> bool:
    """wandb runs offline unless the user asked for online logging (an entity, or WANDB_MODE=online)."""
    if node.get("offline") is not None:
        return bool(node.offline)
    return not (node.get("entity") or os.environ.get("WANDB_MODE") == "online")


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node and "_target_" in node:
            extra = {}
            if name == "wandb":
                os.environ.setdefault("WANDB_SILENT", "true")
                extra = {"id": wandb_run_id(run_dir), "resume": "allow", "offline": wandb_offline(node)}
            loggers.append(hydra.utils.instantiate(node, **extra))
    return loggers


def run(cfg: DictConfig) -> tuple[Path, bool]:
    """Train with a composed config; returns the export directory and whether this process is global rank 0."""
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_required_values(cfg)
    check_devices(cfg.trainer)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    pl.seed_everything(cfg.seed, workers=True)

    module = DINOModule(
        backbone=_container(cfg.backbone),
        dino=_container(cfg.dino),
        batch_size=cfg.data.batch_size,
        diagnostics_every_n_steps=cfg.monitor.diagnostics_every_n_steps,
    )
    datamodule = StreamingDataModule(
        dataset=_container(cfg.dataset),
        data=_container(cfg.data),
        crops=_container(cfg.dino.crops),
        data_root=str(cfg.paths.data_root),
        seed=cfg.seed,
    )
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        strategy=build_strategy(cfg),
        callbacks=build_callbacks(cfg, run_dir),
        logger=build_loggers(cfg, run_dir) or False,
    )
    ckpt = find_resume_checkpoint(run_dir)
    if ckpt is not None:
        log.info("resumed from %s at step %d", ckpt, checkpoint_step(ckpt))
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    return run_dir / "export", trainer.is_global_zero


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        export_dir, is_global_zero = run(cfg)
    except (FloatingPointError, ValueError, FileNotFoundError) as err:
        # Bad input and diverged runs end with their one clear message; the traceback goes to the log file.
        log.debug("traceback", exc_info=True)
        log.error("%s", err)
        sys.exit(1)
    if is_global_zero:
        print(f"export_dir={export_dir}")


if __name__ == "__main__":
    main()

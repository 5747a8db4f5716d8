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
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, cast

import hydra
from omegaconf import DictConfig, OmegaConf

# Only light modules at the top: torch, Lightning, timm and the module/data module/callbacks built on them take
# seconds to import, so they are imported inside the functions that use them. `--cfg job`, a bad group option
# (Hydra's "Available options"), a missing required value and a dataset config mistake then fail or print without
# paying for them.
from surgenet_ssl.cluster import PREEMPTION, RunDirInUseError, RunDirLock, TrainingPreempted, is_global_rank_zero
from surgenet_ssl.config_dirs import CONFIG_DIR
from surgenet_ssl.data.mixture import check_dataset_config
from surgenet_ssl.io_utils import write_text_atomic
from surgenet_ssl.resources import (
    apply_torch_threads,
    auto_workers,
    check_worker_cores,
    no_gpu_before_torch,
    usable_cpus,
)
from surgenet_ssl.storage_errors import storage_error_message, write_failure_message

if TYPE_CHECKING:
    import pytorch_lightning as pl

log = logging.getLogger("surgenet_ssl.train")

DDP_STRATEGIES = ("ddp", "ddp_spawn", "ddp_find_unused_parameters_true")


def auto_precision() -> str:
    """bf16-mixed where a GPU supports it, else full fp32 (CPU autocast would only slow the demo down)."""
    if no_gpu_before_torch():  # (a resolver: torch only where there may be a GPU, see the imports at the top)
        return "32-true"
    import torch

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
OmegaConf.register_new_resolver("surgenet.auto_workers", auto_workers, replace=True)


# Lightning warnings that are wrong or not ours to fix for this project; printed mid-progress-bar they break it.
BENIGN_WARNINGS = (
    # the GPU-augmentation hook lives on the module on purpose (it needs the crop config and the device)
    r"You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a `LightningDataModule`",
    # MixtureStream gives each worker its own share of batches, so its len() is exact with any number of workers
    r"Your `IterableDataset` has `__len__` defined",
    # Lightning's own use of a torch pytree API that newer torch deprecates
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


def silence_benign_warnings() -> None:
    """Keep the console (and the progress bar) free of the warnings listed in ``BENIGN_WARNINGS``."""
    import warnings

    # Lightning adds warning filters of its own when imported: import it first so that ours stay in front of them.
    import pytorch_lightning  # noqa: F401

    for pattern in BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


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


# Trainer kwargs that come from other config groups (logger/, callbacks/), not from trainer.*.
_TRAINER_BUILT_ELSEWHERE = ("callbacks", "logger")


def _closest(name: str, options) -> str:
    import difflib

    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" Did you mean trainer.{match[0]}?" if match else ""


def trainer_kwargs(trainer_cfg: DictConfig) -> dict:
    """The ``trainer`` group as Trainer kwargs, checked against ``Trainer.__init__``: a misspelt key fails at once
    with the closest valid name. A declared key this Lightning version does not know is dropped while it holds its
    default (null), so the config works across the supported Lightning versions."""
    import inspect

    import pytorch_lightning as pl

    accepted = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    kwargs = {str(k): v for k, v in trainer_cfg.items() if k != "_target_"}  # (config keys are strings)
    for key in list(kwargs):
        if key in _TRAINER_BUILT_ELSEWHERE:
            raise ValueError(
                f"trainer.{key} cannot be set: it is built from the `{key}` config group (e.g. {key}.<name>.*=...)."
            )
        if key not in accepted:
            if kwargs[key] is None:
                del kwargs[key]
                continue
            raise ValueError(
                f"trainer.{key} is not a pytorch_lightning.Trainer argument (Lightning {pl.__version__})."
                f"{_closest(key, accepted)} "
                "Every Trainer argument can be set as trainer.<argument>=value; see `python -m surgenet_ssl.train "
                "--cfg job` for the declared ones."
            )
    return kwargs


def check_devices(trainer_cfg: DictConfig) -> None:
    """Fail at once, with the fix, when the requested GPUs are not there (instead of a hang or a deep error)."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    devices = trainer_cfg.get("devices", "auto")
    if accelerator in ("gpu", "cuda"):
        import torch

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
    check_cpu_processes(trainer_cfg)


def check_cpu_processes(trainer_cfg: DictConfig) -> None:
    """CPU training with ``trainer.devices=N`` starts N processes: more than the usable cores fails at once with the
    fix (each process would get a fraction of a core), unless the DDP strategy was asked for explicitly."""
    import torch

    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator not in ("cpu", "auto") or (accelerator == "auto" and torch.cuda.device_count() > 0):
        return
    devices = trainer_cfg.get("devices", "auto")
    wanted = int(devices) if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()) else None
    cores = usable_cpus()
    if wanted is None or wanted <= 1 or wanted <= cores:
        return
    if str(trainer_cfg.get("strategy", "auto")) in DDP_STRATEGIES:
        if _is_local_zero():
            log.warning("trainer.devices=%d CPU processes on %d usable core(s): expect slow steps", wanted, cores)
        return
    raise ValueError(
        f"trainer.devices={devices} asks for {wanted} CPU training processes but only {cores} CPU core(s) are usable "
        f"here. Use trainer.devices={cores} (or fewer), or add trainer.strategy=ddp to run {wanted} processes on "
        f"{cores} core(s) anyway (slow; for testing the DDP code path)."
    )


def _is_local_zero() -> bool:
    """The first training process of this node (Lightning's DDP children have LOCAL_RANK, SLURM tasks SLURM_LOCALID)."""
    return os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) == "0"


def _multi_gpu_auto(trainer_cfg: DictConfig) -> bool:
    """True when ``accelerator``/``devices`` left on auto will start several GPU processes on this node."""
    import torch

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


def wandb_run_id(run_dir: Path) -> str:
    """One wandb run id per run dir, so a resumed or requeued run continues the same wandb run. Written by global
    rank 0 only (the other ranks do not log to wandb)."""
    id_file = run_dir / "wandb_run_id.txt"
    if id_file.is_file():
        return id_file.read_text().strip()
    import secrets

    run_id = secrets.token_hex(4)
    if is_global_rank_zero():
        write_text_atomic(id_file, run_id)
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
        from surgenet_ssl.checkpointing import remove_partial_saves

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

    from surgenet_ssl.checkpointing import checkpoint_step, choose_resume_checkpoint
    from surgenet_ssl.datamodule import StreamingDataModule
    from surgenet_ssl.module import DINOModule

    pl.seed_everything(cfg.seed, workers=True)
    apply_torch_threads(cfg.data.get("torch_threads"), int(cfg.data.num_workers), cfg.trainer, _is_local_zero())
    if _is_local_zero():
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


def build_plugins(user_plugins) -> list:
    """The user's ``trainer.plugins`` plus ours: atomic checkpoint writes in the destination directory, and on SLURM
    the cluster environment without Lightning's own requeue handler (ours checkpoints outside the signal handler)."""
    from pytorch_lightning.plugins.environments import SLURMEnvironment

    from surgenet_ssl.checkpointing import AtomicCheckpointIO

    plugins = list(user_plugins) if isinstance(user_plugins, (list, tuple)) else [user_plugins] if user_plugins else []
    if not any(hasattr(p, "save_checkpoint") for p in plugins):
        plugins.append(AtomicCheckpointIO())
    if SLURMEnvironment.detect() and not any(isinstance(p, SLURMEnvironment) for p in plugins):
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def _close_loggers() -> None:
    """Finish wandb before the last message (its teardown on a full disk would print after it)."""
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1)
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        export_dir, is_global_zero = run(cfg)
    except TrainingPreempted as stop:
        # Every rank stopped at the same step after the checkpoint was written; rank 0 requeues the job.
        if is_global_rank_zero():
            outcome = PREEMPTION.requeue()
            print(f"preempted at optimizer step {stop.step}: checkpoint {stop.checkpoint}; {outcome}", flush=True)
        return
    except (FloatingPointError, ValueError, FileNotFoundError, RunDirInUseError) as err:
        # Bad input and diverged runs end with their one clear message; the traceback goes to the log file.
        storage = storage_error_message(err)
        log.debug("traceback", exc_info=True)
        log.error("%s", storage or err)
        sys.exit(1)
    except (OSError, RuntimeError) as err:
        # a full, read-only or forbidden disk: the path and the fix (torch.save's own errors on a full run dir too)
        storage = write_failure_message(err, Path(cfg.paths.output_dir) / "checkpoints" / "x")
        if storage is None:
            raise
        log.debug("traceback", exc_info=True)
        logging.raiseExceptions = False  # log handlers writing to the full disk (wandb's too) stay silent
        _close_loggers()
        log.error("%s", storage)
        sys.exit(1)
    except SystemExit as stop:
        if type(stop).__name__ != "SIGTERMException":  # Lightning's: SIGTERM stopped training (exit status 0)
            raise
        log.error(
            "training stopped early: SIGTERM received (not the SLURM preemption signal, which checkpoints and "
            "requeues). Rerun the same command to resume from the newest checkpoint in %s.",
            Path(cfg.paths.output_dir) / "checkpoints",
        )
        sys.exit(128 + signal.SIGTERM)
    if is_global_zero:
        print(f"export_dir={export_dir}")


if __name__ == "__main__":
    main()

"""The Trainer set-up shared by pretraining (``surgenet_ssl.train``) and fine-tuning (``surgenet_ssl.finetune``):
the ``trainer`` group checked as Trainer kwargs, the devices and CPU processes it asks for, the DDP strategy with the
configured timeout, our plugins (atomic checkpoint writes, SLURM without Lightning's requeue), the loggers and the
Lightning warnings that are silenced.

Light on import: torch and Lightning are imported inside the functions that need them.
"""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from surgenet_ssl.runtime.cluster import is_global_rank_zero
from surgenet_ssl.runtime.io_utils import write_text_atomic
from surgenet_ssl.runtime.resources import usable_cpus

log = logging.getLogger(__name__)

DDP_STRATEGIES = ("ddp", "ddp_spawn", "ddp_find_unused_parameters_true")


# Lightning warnings that are wrong or not ours to fix for this project; printed mid-progress-bar they break it.
BENIGN_WARNINGS = (
    # the GPU-augmentation hook lives on the module on purpose (it needs the crop config and the device)
    r"You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a `LightningDataModule`",
    # data.decode=gpu: the module decodes the JPEG bytes on the device (it needs them on the host first)
    r"You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a `LightningDataModule`",
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
        if is_local_zero():
            log.warning("trainer.devices=%d CPU processes on %d usable core(s): expect slow steps", wanted, cores)
        return
    raise ValueError(
        f"trainer.devices={devices} asks for {wanted} CPU training processes but only {cores} CPU core(s) are usable "
        f"here. Use trainer.devices={cores} (or fewer), or add trainer.strategy=ddp to run {wanted} processes on "
        f"{cores} core(s) anyway (slow; for testing the DDP code path)."
    )


def is_local_zero() -> bool:
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


def build_plugins(user_plugins) -> list:
    """The user's ``trainer.plugins`` plus ours: atomic checkpoint writes in the destination directory, and on SLURM
    the cluster environment without Lightning's own requeue handler (ours checkpoints outside the signal handler)."""
    from pytorch_lightning.plugins.environments import SLURMEnvironment

    from surgenet_ssl.runtime.checkpointing import AtomicCheckpointIO

    plugins = list(user_plugins) if isinstance(user_plugins, (list, tuple)) else [user_plugins] if user_plugins else []
    if not any(hasattr(p, "save_checkpoint") for p in plugins):
        plugins.append(AtomicCheckpointIO())
    if SLURMEnvironment.detect() and not any(isinstance(p, SLURMEnvironment) for p in plugins):
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


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

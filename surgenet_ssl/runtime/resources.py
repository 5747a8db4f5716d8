"""CPU budget of a training process: loader workers and torch threads that fit the machine.

Why: a fixed ``num_workers: 8`` plus torch's default of one intra-op thread per core oversubscribes small machines
(on a 2-core box, 2 torch threads next to the loader workers made a DINO step 4x slower than 1 thread: 1842 vs
471 ms). Here every training process on a node gets ``usable cores / processes on the node``; its loader workers
take ``that - 1`` (at most 8) and torch keeps the rest (at least 1 thread); workers run single-threaded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

# torch is imported inside the functions that use it: `surgenet.auto_workers` is a config resolver, registered by
# the entry points before Hydra composes the config, and importing torch takes seconds.

log = logging.getLogger(__name__)

MAX_AUTO_WORKERS = 8


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a SLURM/cgroup allocation), else all cores."""
    if hasattr(os, "sched_getaffinity"):
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except OSError:
            pass
    return max(1, os.cpu_count() or 1)


def _as_count(devices: Any, available: int) -> int | None:
    """``trainer.devices`` (int, "N", -1/"auto", list of ids) -> number of devices; None when unknown."""
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        return available if devices == -1 else devices
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            return available
        if text.isdigit():
            return int(text)
        if "," in text:  # "0,1"
            return len([d for d in text.split(",") if d.strip()])
        return None
    if isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, Mapping)):
        return len(devices)
    return None


# /dev entries without which no CUDA/ROCm device can be seen: NVIDIA (desktop/server, Jetson), AMD ROCm, WSL2.
_GPU_DEVICE_NODES = ("nvidia", "nvhost", "nvgpu", "nvmap", "kfd", "dxg")


def no_gpu_before_torch() -> bool:
    """True when torch is not imported yet and this is a Linux machine without any GPU device node, where torch
    could see no GPU: the config resolvers answer then without importing torch (seconds), for Hydra calls them
    already while it composes the config (e.g. for ``--cfg job``). Once torch is imported, it is always asked."""
    if "torch" in sys.modules or not sys.platform.startswith("linux"):
        return False
    try:
        return not any(name.startswith(_GPU_DEVICE_NODES) for name in os.listdir("/dev"))
    except OSError:
        return False


def cuda_device_count() -> int:
    """``torch.cuda.device_count()`` (0 without importing torch where :func:`no_gpu_before_torch`)."""
    if no_gpu_before_torch():
        return 0
    import torch

    return torch.cuda.device_count()


def local_training_processes(trainer_cfg: Mapping | None) -> int:
    """Training processes this node runs for ``trainer_cfg`` (one per device), sharing this process' CPU set.

    Under SLURM with one task per GPU, a task that is bound to its own CPUs (fewer usable cores than
    ``SLURM_CPUS_ON_NODE``) does not share them with the other ranks: 1.
    """
    if not trainer_cfg:
        return 1
    accelerator = str(trainer_cfg.get("accelerator", "auto") or "auto")
    devices = trainer_cfg.get("devices", "auto")
    gpus = cuda_device_count() if accelerator in ("auto", "gpu", "cuda") else 0
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpus > 0):
        count = _as_count(devices, gpus)
    elif accelerator == "auto" and devices in ("auto", -1, "-1"):
        count = 1  # Lightning's CPU default: one process
    else:
        count = _as_count(devices, 1)
    count = max(1, count or 1)
    cpus_on_node = os.environ.get("SLURM_CPUS_ON_NODE", "")
    if count > 1 and cpus_on_node.isdigit() and usable_cpus() < int(cpus_on_node):
        return 1
    return count


def cpus_per_process(trainer_cfg: Mapping | None = None) -> int:
    """Cores each training process of this node may use (at least 1)."""
    return max(1, usable_cpus() // local_training_processes(trainer_cfg))


def trains_on_cpu(trainer_cfg: Mapping | None) -> bool:
    """True when ``trainer_cfg`` trains on the CPU (``accelerator: cpu``, or ``auto`` where no GPU is seen); False
    for GPUs and when unknown."""
    if not trainer_cfg:
        return False
    accelerator = str(trainer_cfg.get("accelerator", "auto") or "auto")
    return accelerator == "cpu" or (accelerator == "auto" and cuda_device_count() == 0)


def auto_workers(cap: int | str | None = None, _root_: Any = None) -> int:
    """Resolver ``${surgenet.auto_workers:}`` (``${surgenet.auto_workers:2}`` caps at 2): loader workers per
    training process = its cores - 1 (the training process keeps one), at most 8; 0 on a single core, where a
    worker process would only compete with training for the same core.

    Also 0 for a process that trains on the CPU with only 2 cores: its step is compute-bound, so a worker's core
    idles while the worker waits on a full queue, and the step runs on the one core left. Loading in the training
    process between steps (the demo's loader: 20 ms a batch) and computing on both cores is faster: the demo's DINO
    step takes 1.07 s on 2 threads vs 2.19 s on 1 (``scripts/bench_step.py --backbone caformer_s18 --global-size 64
    --local-size 32 --local-number 2 --threads N``), and the whole demo run 3 minutes instead of 4.5 on a 2-core
    machine (1 torch thread was already the best next to a worker: 2 made the step 4x slower)."""
    limit = MAX_AUTO_WORKERS if cap in (None, "") else int(cap)
    trainer_cfg = _root_.get("trainer") if _root_ is not None and hasattr(_root_, "get") else None
    cores = cpus_per_process(trainer_cfg)
    if cores <= 2 and trains_on_cpu(trainer_cfg):
        return 0
    return max(0, min(limit, cores - 1))


def auto_torch_threads(num_workers: int, trainer_cfg: Mapping | None = None) -> int:
    """Intra-op threads of a training process: its cores minus one per loader worker, at least 1."""
    return max(1, cpus_per_process(trainer_cfg) - max(0, int(num_workers)))


def apply_torch_threads(
    requested: int | None, num_workers: int, trainer_cfg: Mapping | None = None, announce: bool = True
) -> int:
    """Set torch's intra-op threads of this process (``requested``, or ``auto_torch_threads`` when None) and log
    the choice (``announce``: on one rank only). Returns the thread count."""
    auto = requested is None
    threads = auto_torch_threads(num_workers, trainer_cfg) if requested is None else int(requested)
    if threads < 1:
        raise ValueError(f"data.torch_threads must be >= 1 or null (auto), got {requested}")
    import torch

    torch.set_num_threads(threads)
    if announce:
        processes = local_training_processes(trainer_cfg)
        log.info(
            "CPU budget: %d usable cores, %d training process(es) on this node, %d loader worker(s) and %d torch "
            "thread(s) per process (%s; data.num_workers / data.torch_threads override)",
            usable_cpus(),
            processes,
            num_workers,
            threads,
            "auto" if auto else "data.torch_threads",
        )
    return threads


def check_worker_cores(num_workers: int) -> str | None:
    """Warn (and return the message) when this process may use fewer cores than its loader workers + itself:
    under SLURM >= 22.05 ``srun`` no longer inherits ``--cpus-per-task`` from ``sbatch``, so each task is bound to
    one core while ``data.num_workers`` workers are started, all on that core."""
    cores, wanted = usable_cpus(), max(0, int(num_workers)) + 1
    if num_workers <= 0 or cores >= wanted:
        return None
    fix = "lower data.num_workers"
    if os.environ.get("SLURM_JOB_ID"):
        fix = (
            "pass the cores to the step: srun --cpus-per-task=$SLURM_CPUS_PER_TASK ... (SLURM >= 22.05 does not "
            "inherit it from sbatch; slurm/*.sbatch do), or " + fix
        )
    message = (
        f"this process may use {cores} CPU core(s) but data.num_workers={num_workers} loader workers and the "
        f"training process assume {wanted}: the workers share {cores} core(s) and the GPU waits for data. Fix: {fix}"
    )
    log.warning(message)
    return message


def limit_worker_threads() -> None:
    """Inside a loader worker: one torch thread (each worker already is one of the process' cores). OpenCV's thread
    count is set in the parent before the fork (:func:`single_threaded_opencv_fork`): changing it inside a forked
    child can deadlock on the pool threads the child does not have."""
    import torch

    torch.set_num_threads(1)


@contextlib.contextmanager
def single_threaded_opencv_fork() -> Iterator[None]:
    """Wrap the creation of forked loader workers: they inherit a one-thread OpenCV, the parent gets its own back."""
    try:
        import cv2
    except ImportError:  # pragma: no cover - opencv is a dependency
        yield
        return
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)

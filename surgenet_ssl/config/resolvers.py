"""The ``${surgenet.*}`` config resolvers of the training and fine-tuning configs, registered on import.

``surgenet.auto_precision`` (bf16-mixed where the GPU supports it, else fp32), ``surgenet.sweep_subdir`` (a sweep
job's dir name) and ``surgenet.auto_workers`` (loader workers that fit the machine). Light on purpose: torch is
imported only when a precision is resolved on a machine that may have a GPU, so the entry points import this before
Hydra composes anything. (``surgenet.user_config_dirs`` is registered by :mod:`surgenet_ssl.config.dirs`.)
"""

from __future__ import annotations

from omegaconf import OmegaConf

from surgenet_ssl.runtime.resources import auto_workers, no_gpu_before_torch

__all__ = ["auto_precision", "sweep_subdir"]


def auto_precision() -> str:
    """bf16-mixed where a GPU supports it, else full fp32 (CPU autocast would only slow the demo down)."""
    if no_gpu_before_torch():  # (a resolver: torch only where there may be a GPU, see the module docstring)
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

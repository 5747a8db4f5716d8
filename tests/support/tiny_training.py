"""Small in-memory stand-ins used by the training tests (real Lightning Trainer, tiny timm backbone)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

TINY_BACKBONE = {"name": "timm", "timm_name": "test_resnet", "drop_path_rate": 0.0}


def tiny_dino(out_dim: int = 32, local_number: int = 2) -> dict:
    return {
        "out_dim": out_dim,
        "head": {"hidden_dim": 16, "bottleneck_dim": 8, "nlayers": 3, "use_bn": False, "norm_last_layer": True},
        "crops": {
            "global_size": 32,
            "local_size": 16,
            "global_scale": [0.4, 1.0],
            "local_scale": [0.05, 0.4],
            "local_number": local_number,
        },
        "loss": {
            "student_temp": 0.1,
            "teacher_temp": 0.04,
            "warmup_teacher_temp": 0.04,
            "warmup_teacher_temp_epochs": 0,
            "center_momentum": 0.9,
        },
        "optimizer": {
            "base_lr": 5e-4,
            "reference_batch": 256,
            "min_lr": 1e-6,
            "warmup_epochs": 1,
            "weight_decay": 0.04,
            "weight_decay_end": 0.4,
            "clip_grad": 3.0,
            "freeze_last_layer": 1,
        },
        "teacher": {"momentum": 0.996, "momentum_end": 1.0},
    }


def quiet_trainer(root, **kwargs):
    """A one-epoch CPU Trainer without logger, checkpoints, progress bar or summary (``kwargs`` override)."""
    import pytorch_lightning as pl

    options = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False)
    options |= dict(enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    return pl.Trainer(**(options | kwargs))


def crop_batches(n_batches: int, batch_size: int, local_number: int = 2, seed: int = 0, nan_at: int | None = None):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n_batches):
        crops = [torch.randn(batch_size, 3, 32, 32, generator=g) for _ in range(2)]
        crops += [torch.randn(batch_size, 3, 16, 16, generator=g) for _ in range(local_number)]
        if nan_at is not None and i == nan_at:
            crops[0][0, 0, 0, 0] = float("nan")
        batches.append({"crops": crops, "source": torch.zeros(batch_size, dtype=torch.long), "key": [""] * batch_size})
    return DataLoader(batches, batch_size=None, shuffle=False)

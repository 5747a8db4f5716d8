"""DINO in plain PyTorch: no Lightning, no Hydra, no files, so each piece can be read and tested alone.

The LightningModule in ``surgenet_ssl.training.module`` wires these parts into a training loop.
"""

from surgenet_ssl.dino.ema import update_teacher
from surgenet_ssl.dino.head import DINOHead
from surgenet_ssl.dino.loss import DINOLoss
from surgenet_ssl.dino.multicrop import MultiCropWrapper
from surgenet_ssl.dino.optim import (
    cancel_last_layer_gradients,
    clip_gradients_per_module,
    clip_gradients_per_parameter,
    param_groups,
)
from surgenet_ssl.dino.schedules import cosine_schedule, teacher_temp_schedule

__all__ = [
    "DINOHead",
    "DINOLoss",
    "MultiCropWrapper",
    "cancel_last_layer_gradients",
    "clip_gradients_per_module",
    "clip_gradients_per_parameter",
    "cosine_schedule",
    "param_groups",
    "teacher_temp_schedule",
    "update_teacher",
]

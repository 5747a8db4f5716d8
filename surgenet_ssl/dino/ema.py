"""The EMA ("momentum") teacher update."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, parameters only, as the official DINO /
    DINOv2 EMA: the teacher keeps its own buffers (BatchNorm running statistics from its own forward passes).

    Both modules must have the same architecture. Uses the ``_foreach`` kernels: one launch for all tensors.
    """
    s_params = [p.detach() for p in student.parameters()]
    t_params: list[torch.Tensor] = [p for p in teacher.parameters()]
    if len(s_params) != len(t_params):
        raise ValueError(f"student has {len(s_params)} parameters but teacher has {len(t_params)}")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)

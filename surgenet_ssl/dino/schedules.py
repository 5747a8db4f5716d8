"""Per-iteration schedules of the DINO recipe (lr, weight decay, teacher momentum, teacher temperature)."""

from __future__ import annotations

import math

import torch


def cosine_schedule(
    base_value: float,
    final_value: float,
    total_steps: int,
    warmup_steps: int = 0,
    start_warmup_value: float = 0.0,
) -> torch.Tensor:
    """Linear warmup from ``start_warmup_value`` to ``base_value`` over ``warmup_steps``, then a half cosine towards
    ``final_value``, exactly as the official DINO ``cosine_scheduler``:

    value(warmup + i) = final + 0.5 * (base - final) * (1 + cos(pi * i / n)),  i = 0..n-1,  n = total - warmup.
    Returns a float64 tensor of length ``total_steps``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = max(0, min(warmup_steps, total_steps))
    warmup = (
        torch.linspace(start_warmup_value, base_value, warmup_steps, dtype=torch.float64)
        if warmup_steps
        else (torch.empty(0, dtype=torch.float64))
    )
    rest = total_steps - warmup_steps
    i = torch.arange(rest, dtype=torch.float64)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + torch.cos(math.pi * i / max(rest, 1)))
    return torch.cat([warmup, cosine])


def teacher_temp_schedule(
    warmup_teacher_temp: float, teacher_temp: float, warmup_steps: int, total_steps: int
) -> torch.Tensor:
    """Linear warmup of the teacher temperature, then constant (official DINO, expressed per iteration)."""
    warmup_steps = max(0, min(warmup_steps, total_steps))
    warmup = torch.linspace(warmup_teacher_temp, teacher_temp, warmup_steps, dtype=torch.float64)
    return torch.cat([warmup, torch.full((total_steps - warmup_steps,), teacher_temp, dtype=torch.float64)])


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 256, rule: str = "linear") -> float:
    """The peak lr for a global batch: DINO's linear rule ``base_lr * global_batch / reference_batch`` or DINOv2's
    ``sqrt_wrt_1024``, ``base_lr * sqrt(global_batch / reference_batch)`` (with reference_batch 1024)."""
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch / reference_batch)
    if rule != "linear":
        raise ValueError(f"lr scaling rule must be 'linear' or 'sqrt', got {rule!r}")
    return base_lr * global_batch / reference_batch

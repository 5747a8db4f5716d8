"""Optimizer-side details of the DINO recipe: parameter groups, per-parameter clipping, last-layer freezing."""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups: weights get weight decay; biases and every 1-D parameter (norms, scales) get none.

    The "regularized" group is first so schedules can set its weight decay and leave the other at 0.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}]


@torch.no_grad()
def clip_gradients_per_parameter(model: nn.Module, max_norm: float) -> list[float]:
    """Scale each parameter's gradient so its own L2 norm is at most ``max_norm`` (not a global-norm clip).

    Matches the official DINO ``clip_gradients``: coef = max_norm / (norm + 1e-6), applied only when coef < 1.
    Returns the per-parameter norms before clipping (for logging).
    """
    norms = []
    for p in model.parameters():
        if p.grad is None:
            continue
        norm = p.grad.detach().norm(2)
        norms.append(float(norm))
        coef = max_norm / (norm + 1e-6)
        if coef < 1:
            p.grad.mul_(coef)
    return norms


def cancel_last_layer_gradients(model: nn.Module, epoch: int, freeze_last_layer: int) -> bool:
    """Drop the gradients of the head's prototypes layer during the first ``freeze_last_layer`` epochs.

    Setting ``grad = None`` (not zero) makes AdamW skip the parameter entirely, weight decay included.
    Returns True when gradients were cancelled.
    """
    if epoch >= freeze_last_layer:
        return False
    cancelled = False
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None
            cancelled = True
    return cancelled

"""Optimizer-side details of the DINO recipe: parameter groups, per-parameter clipping, last-layer freezing."""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups: weights get weight decay; biases and every 1-D parameter (norms, scales) get none.

    The "regularized" group is first so schedules can set its weight decay and leave the other at 0.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}]


@torch.no_grad()
def clip_gradients_per_parameter(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Scale each parameter's gradient so its own L2 norm is at most ``max_norm`` (not a global-norm clip).

    Matches the official DINO ``clip_gradients``: coef = max_norm / (norm + 1e-6), applied only when coef < 1
    (here: clamped to 1, and multiplying by exactly 1.0 leaves a gradient unchanged). Written with the ``_foreach``
    kernels and without reading any value on the host, so it never waits for the device.

    Returns the total L2 norm of all gradients before clipping, as a 0-d float32 tensor on the gradients' device
    (for logging; reading it is the caller's choice, e.g. Lightning's logger every ``log_every_n_steps``).
    """
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    squares = []
    for grads in groups.values():
        norms = torch.stack(torch._foreach_norm(grads, 2)).float()
        coefs = (max_norm / (norms + 1e-6)).clamp_(max=1.0)
        torch._foreach_mul_(grads, list(coefs.to(grads[0].dtype).unbind(0)))
        squares.append(norms.square().sum())
    if not squares:
        return torch.zeros(())
    device = next(iter(groups))[0]
    return torch.stack([s.to(device) for s in squares]).sum().sqrt()


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

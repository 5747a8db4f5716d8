"""Optimizer-side details of the DINO recipe: parameter groups (DINOv2: layer-wise lr decay), clipping, freezing."""

from __future__ import annotations

import torch
from torch import nn

# Parameters that sit before the first ViT block (DINOv2's layer 0); ``reg_token`` is timm's ``register_tokens``.
_LAYER_ZERO = ("pos_embed", "patch_embed", "mask_token", "cls_token", "reg_token", "register_tokens")


def vit_layer_id(name: str, depth: int) -> int:
    """DINOv2's ``get_vit_lr_decay_rate`` layer index of a student parameter: 0 for the embeddings and tokens
    (the iBOT mask token included, wherever it lives), i + 1 for ``blocks.i``, depth + 1 for the rest (final norm,
    heads)."""
    if any(part in name for part in _LAYER_ZERO):
        return 0
    marker = "blocks."
    at = name.find(marker)
    if at >= 0 and (at == 0 or name[at - 1] == "."):
        return int(name[at + len(marker) :].split(".")[0]) + 1
    return depth + 1


def param_groups(
    model: nn.Module,
    layerwise_decay: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    backbone_lr_mult: float = 1.0,
    split_last_layer: bool = False,
) -> list[dict]:
    """AdamW groups: weights get weight decay; biases and every 1-D parameter (norms, scales) get none.

    With the defaults: two groups, "decay" first and "no_decay" (DINO). DINOv2's options give each group an
    ``lr_multiplier`` (applied by the training step to the scheduled lr): ``layerwise_decay ** (depth + 1 - layer)``
    over the ViT blocks of ``model.backbone`` (:func:`vit_layer_id`), times ``patch_embed_lr_mult`` for the patch
    embedding and ``backbone_lr_mult`` for the backbone and mask token; ``split_last_layer`` puts the head's
    prototypes in groups of their own (``is_last_layer``) so their lr can be 0 while frozen (DINOv2). Every group
    carries ``wd_multiplier`` (1 or 0).
    """
    backbone = getattr(model, "backbone", None)
    blocks = getattr(backbone, "blocks", None)
    depth = len(blocks) if isinstance(blocks, nn.Sequential | nn.ModuleList) else 0
    groups: dict[tuple[bool, float, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (name.endswith(".bias") or p.ndim <= 1)
        in_backbone = name.startswith("backbone.") or name == "mask_token"
        lr_mult = 1.0
        if in_backbone:
            lr_mult = backbone_lr_mult
            if depth and layerwise_decay != 1.0:
                lr_mult *= layerwise_decay ** (depth + 1 - vit_layer_id(name, depth))
            if "patch_embed" in name:
                lr_mult *= patch_embed_lr_mult
        last = split_last_layer and "last_layer" in name
        key = (decay, lr_mult, last)
        if key not in groups:
            suffix = "" if (lr_mult, last) == (1.0, False) else f"_lr{lr_mult:.4g}{'_last_layer' if last else ''}"
            groups[key] = {
                "params": [],
                "name": ("decay" if decay else "no_decay") + suffix,
                "lr_multiplier": lr_mult,
                "wd_multiplier": 1.0 if decay else 0.0,
                "is_last_layer": last,
                **({} if decay else {"weight_decay": 0.0}),
            }
        groups[key]["params"].append(p)
    # "decay" then "no_decay" first (DINO's two groups, in its order), then the others as met
    plain = [groups.pop(k, None) for k in ((True, 1.0, False), (False, 1.0, False))]
    first = [g if g is not None else _empty(decay) for g, decay in zip(plain, (True, False), strict=True)]
    return first + list(groups.values())


def _empty(decay: bool) -> dict:
    return {
        "params": [],
        "name": "decay" if decay else "no_decay",
        "lr_multiplier": 1.0,
        "wd_multiplier": 1.0 if decay else 0.0,
        "is_last_layer": False,
        **({} if decay else {"weight_decay": 0.0}),
    }


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


@torch.no_grad()
def clip_gradients_per_module(modules: list[nn.Module], max_norm: float) -> torch.Tensor:
    """DINOv2's clipping: each module's (backbone, DINO head, iBOT head) gradients scaled together so that their
    global L2 norm is at most ``max_norm`` (coef = max_norm / (norm + 1e-6), at most 1). No host sync. Returns the
    total norm of all gradients before clipping (0-d float32)."""
    norms = [
        torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.grad is not None], max_norm, foreach=True)
        for m in modules
    ]
    norms = [n.float() for n in norms if n.numel()]
    if not norms:
        return torch.zeros(())
    return torch.stack([n.to(norms[0].device) for n in norms]).square().sum().sqrt()


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

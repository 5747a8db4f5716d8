"""ViT backbones of DINO, DINOv2 and DINOv3 (timm models), and Meta's DINOv2 checkpoint layout in timm naming.

Why here: the official DINOv2 files (``dinov2_vit*14(_reg4)_pretrain.pth`` and the training checkpoints' ``teacher``)
name their tensors like timm except for a few, and hold a ``mask_token`` that timm's ViT has no place for (in this
package it lives next to the backbone, on the student/teacher wrapper, where the iBOT step uses it):

* ``register_tokens`` -> ``reg_token``; with registers timm's ViT adds no position to the CLS token
  (``no_embed_class``), so the CLS position ``pos_embed[:, 0]`` is folded into ``cls_token`` (the official forward
  adds it to the CLS token before the registers are inserted: the same sum);
* ``blocks.<chunk>.<i>.`` (FSDP block chunks of training checkpoints) -> ``blocks.<i>.``; ``mlp.w12`` / ``mlp.w3``
  (SwiGLU, ViT-g) -> ``mlp.fc1`` / ``mlp.fc2``;
* ``pos_embed`` of the released files is at 518 px (37 x 37 patches): :func:`resample_pos_embed` brings it to the
  model's grid with the official ``interpolate_pos_encoding`` (bicubic, scale factor with the +0.1 offset, no
  antialias), so features at the model's size equal the official model's at that crop size.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

__all__ = [
    "VIT_BACKBONES",
    "VIT_MODELS",
    "from_official_dinov2",
    "is_official_dinov2",
    "pos_embed_prefix_tokens",
    "resample_pos_embed",
    "set_uniform_drop_path",
    "use_official_pos_embed",
    "DINO_V1_VITS",
]

# name -> (timm model, extra kwargs). dynamic_img_size: one model takes global and local crops of any size (a
# multiple of the patch size); the module builds the model at the global crop size like the official training.
VIT_MODELS: dict[str, tuple[str, dict]] = {
    # DINO (v1) ViTs, patch 16
    "vit_small": ("vit_small_patch16_224", {"dynamic_img_size": True}),
    "vit_base": ("vit_base_patch16_224", {"dynamic_img_size": True}),
    "vit_large": ("vit_large_patch16_224", {"dynamic_img_size": True}),
    # DINOv2 ViTs, patch 14, LayerScale; _reg4: 4 register tokens (Darcet et al. 2024)
    "dinov2_vits14": ("vit_small_patch14_dinov2", {"dynamic_img_size": True}),
    "dinov2_vitb14": ("vit_base_patch14_dinov2", {"dynamic_img_size": True}),
    "dinov2_vitl14": ("vit_large_patch14_dinov2", {"dynamic_img_size": True}),
    "dinov2_vits14_reg4": ("vit_small_patch14_reg4_dinov2", {"dynamic_img_size": True}),
    "dinov2_vitb14_reg4": ("vit_base_patch14_reg4_dinov2", {"dynamic_img_size": True}),
    "dinov2_vitl14_reg4": ("vit_large_patch14_reg4_dinov2", {"dynamic_img_size": True}),
    # DINOv3 ViTs, patch 16, RoPE (no position table), 4 registers; CLS pooling like the official model
    "dinov3_vits16": ("vit_small_patch16_dinov3", {"dynamic_img_size": True, "global_pool": "token"}),
    "dinov3_vitb16": ("vit_base_patch16_dinov3", {"dynamic_img_size": True, "global_pool": "token"}),
    "dinov3_vitl16": ("vit_large_patch16_dinov3", {"dynamic_img_size": True, "global_pool": "token"}),
}

VIT_BACKBONES: tuple[str, ...] = tuple(VIT_MODELS)
# DINO (v1) ViTs: the official DINO ViT draws cls_token with trunc_normal_(std=0.02) (timm and the official DINOv2
# ViT: normal_(std=1e-6), kept for the DINOv2 models)
DINO_V1_VITS: tuple[str, ...] = ("vit_small", "vit_base", "vit_large")
POS_EMBED_RESAMPLING = ("timm", "official")


def use_official_pos_embed(model: nn.Module) -> None:
    """Crops of another size than the model's grid get the position table resampled at run time like the official
    DINO / DINOv2 ``interpolate_pos_encoding`` (:func:`resample_pos_embed`: bicubic, +0.1 scale-factor offset, no
    antialias) instead of timm's ``resample_abs_pos_embed`` (sized by target, antialiased when shrinking). Patches
    the model's ``_pos_embed``; a model without a position table (DINOv3: RoPE) is left as it is."""
    vit: Any = model
    if getattr(vit, "pos_embed", None) is None or not getattr(vit, "dynamic_img_size", False):
        return
    original = vit._pos_embed

    def _pos_embed(x: Tensor) -> Tensor:
        grid = tuple(vit.patch_embed.grid_size)
        if x.ndim != 4 or tuple(x.shape[1:3]) == grid:
            return original(x)  # the model's own grid: no resampling
        b, h, w, c = x.shape
        pos = resample_pos_embed(vit.pos_embed, (h, w), pos_embed_prefix_tokens(vit))
        x = x.reshape(b, h * w, c)
        to_cat = [t.expand(b, -1, -1) for t in (vit.cls_token, getattr(vit, "reg_token", None)) if t is not None]
        if vit.no_embed_class:  # the same order as timm's _pos_embed
            x = torch.cat([*to_cat, x + pos], dim=1)
        else:
            x = torch.cat([*to_cat, x], dim=1) + pos
        return vit.pos_drop(x)

    vit._pos_embed = _pos_embed


def set_uniform_drop_path(model: nn.Module, rate: float) -> None:
    """Every block drops its residual branches with the same probability ``rate`` (DINOv2's ``drop_path_uniform``),
    instead of timm's linear ramp from 0 at the first block to ``rate`` at the last."""
    for block in model.get_submodule("blocks").children():
        for attr in ("drop_path1", "drop_path2"):
            if hasattr(block, attr):
                setattr(block, attr, DropPath(rate) if rate > 0 else nn.Identity())


# --------------------------------------------------------------------------------------- official DINOv2 layout
_CHUNKED = re.compile(r"^blocks\.\d+\.(?P<i>\d+)\.")
_SWIGLU = re.compile(r"^(?P<b>blocks\.\d+\.mlp\.)(?P<w>w12|w3)\.")


def is_official_dinov2(state_dict: Mapping[str, Tensor]) -> bool:
    """Meta's DINOv2 layout: the backbone carries ``mask_token`` (or ``register_tokens``); timm's never does."""
    return "mask_token" in state_dict or "register_tokens" in state_dict


def from_official_dinov2(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
    """An official DINOv2 backbone state dict -> (timm-named state dict, the ``mask_token`` or None)."""
    sd = dict(state_dict)
    mask_token = sd.pop("mask_token", None)
    if "register_tokens" in sd:
        sd["reg_token"] = sd.pop("register_tokens")
        pos = sd["pos_embed"]
        sd["cls_token"] = sd["cls_token"] + pos[:, :1]
        sd["pos_embed"] = pos[:, 1:]
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        key = _CHUNKED.sub(lambda m: f"blocks.{m['i']}.", key)
        key = _SWIGLU.sub(lambda m: f"{m['b']}{'fc1' if m['w'] == 'w12' else 'fc2'}.", key)
        out[key] = value
    return out, mask_token


def pos_embed_prefix_tokens(model: nn.Module) -> int:
    """How many leading rows of ``model.pos_embed`` belong to prefix tokens (CLS) rather than patches."""
    if getattr(model, "no_embed_class", False):
        return 0
    return 1 if getattr(model, "cls_token", None) is not None else 0


def resample_pos_embed(pos_embed: Tensor, grid: tuple[int, int], num_prefix: int, offset: float = 0.1) -> Tensor:
    """``pos_embed`` (1, prefix + M*M, D) of a square M x M grid -> (1, prefix + h*w, D), as the official DINO /
    DINOv2 ``interpolate_pos_encoding``: bicubic with ``scale_factor = (grid + offset) / M`` and no antialias."""
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    m = int(math.isqrt(patches.shape[1]))
    if m * m != patches.shape[1]:
        raise ValueError(f"pos_embed has {patches.shape[1]} patch positions, not a square grid")
    h, w = grid
    if (h, w) == (m, m):
        return pos_embed
    dim = patches.shape[-1]
    x = patches.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    kwargs: dict = (
        {"scale_factor": ((h + offset) / m, (w + offset) / m)} if offset else {"size": (h, w)}
    )  # the offset avoids floor() rounding the output size down (facebookresearch/dino#8)
    x = F.interpolate(x, mode="bicubic", antialias=False, **kwargs)
    if tuple(x.shape[-2:]) != (h, w):
        raise ValueError(f"resampling pos_embed {m}x{m} -> {h}x{w} gave {tuple(x.shape[-2:])}")
    x = x.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos_embed.dtype)
    return torch.cat([prefix, x], dim=1)

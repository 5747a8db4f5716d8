"""Backbone registry: one name -> one randomly initialised timm model.

Every backbone is a timm model so that training, export, FPN (``features_only``) and downstream loading all
share the same parameter names (timm naming). Weights are never downloaded here: pretraining starts from
scratch, and pretrained weights enter only through ``surgenet_ssl.models.weights.load_backbone_weights``.
"""

from __future__ import annotations

import difflib
from typing import Any, cast

import timm
import torch

from .caformer import surgenet_caformer_s18
from .vit import (
    DINO_V1_VITS,
    POS_EMBED_RESAMPLING,
    VIT_BACKBONES,
    VIT_MODELS,
    set_uniform_drop_path,
    use_official_pos_embed,
)

__all__ = ["BACKBONES", "SURGENET_BACKBONES", "VARIANTS", "build_backbone", "backbone_num_features"]

#: Valid values of ``build_backbone(name=...)`` (and of the ``backbone=`` config group).
BACKBONES: tuple[str, ...] = ("caformer_s18", "convnextv2_tiny", "pvt_v2_b2", *VIT_BACKBONES, "timm")

#: Backbones with a published SurgeNet checkpoint (and hence a SurgeNet naming, see ``convert.py``).
SURGENET_BACKBONES: tuple[str, ...] = ("caformer_s18", "convnextv2_tiny", "pvt_v2_b2")

#: Architecture variants selectable with ``pretrained_variant`` (only caformer_s18 differs between them).
VARIANTS: tuple[str, ...] = ("SurgeNet", "ImageNet")

# Fixed-name backbones -> (timm model name, extra timm kwargs).
_TIMM_MODELS: dict[str, tuple[str, dict]] = {
    "convnextv2_tiny": ("convnextv2_tiny", {}),
    "pvt_v2_b2": ("pvt_v2_b2", {}),
    # DINO / DINOv2 / DINOv3 ViTs (backbones/vit.py); dynamic_img_size: global and local crops of any size
    **VIT_MODELS,
}


def _check_timm_name(timm_name: str | None) -> str:
    if not timm_name:
        raise ValueError(
            "backbone 'timm' needs timm_name (any model name known to timm), e.g. "
            'backbone=timm backbone.timm_name=resnet50. List them with `python -c "import timm; '
            "print(timm.list_models('*resnet*'))\"`."
        )
    if not timm.is_model(timm_name):
        close = difflib.get_close_matches(timm_name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(
            f"timm_name '{timm_name}' is not a timm model.{hint} List candidates with "
            f"`python -c \"import timm; print(timm.list_models('*{timm_name.split('_')[0]}*'))\"`."
        )
    return timm_name


def build_backbone(
    name: str,
    drop_path_rate: float = 0.0,
    timm_name: str | None = None,
    pretrained_variant: str = "SurgeNet",
    drop_path_uniform: bool = False,
    pos_embed_resampling: str = "timm",
    grad_checkpointing: bool = False,
    **timm_kwargs,
) -> torch.nn.Module:
    """Build a randomly initialised backbone.

    By default the model is created with ``num_classes=0`` so ``model(x)`` returns the pooled features
    ``(B, backbone_num_features(model))``; ``timm_kwargs`` are passed to timm and may override that (e.g.
    ``num_classes=12`` for a classifier or ``features_only=True`` for dense heads).

    Args:
        name: one of ``BACKBONES``.
        drop_path_rate: stochastic depth rate (DINO uses 0.1 for the student).
        drop_path_uniform: every ViT block at ``drop_path_rate`` (DINOv2) instead of timm's linear ramp to it.
        timm_name: the timm model name, required for ``name='timm'``.
        pretrained_variant: 'SurgeNet' (ReLU CaFormer, as published) or 'ImageNet' (timm's stock StarReLU
            CaFormer, to load ImageNet weights downstream). Only caformer_s18 differs between variants.
        pos_embed_resampling: ViTs, crops of another size than the model's: 'timm' (timm's antialiased resampling)
            or 'official' (DINO/DINOv2's bicubic with the +0.1 offset, no antialias; see use_official_pos_embed).

        grad_checkpointing: activation checkpointing of the blocks (timm's ``set_grad_checkpointing``): the
            same gradients, less activation memory, about one more forward pass of compute.

    The DINO (v1) ViTs (``vit_small``/``vit_base``/``vit_large``) draw ``cls_token`` like the official DINO ViT
    (truncated normal, std 0.02); the DINOv2 ViTs keep timm's normal(std 1e-6), which is the official DINOv2 init.
    """
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone '{name}'. Valid choices: {', '.join(BACKBONES)}.")
    if pretrained_variant not in VARIANTS:
        raise ValueError(f"Unknown pretrained_variant '{pretrained_variant}'. Valid choices: {', '.join(VARIANTS)}.")
    if timm_kwargs.pop("pretrained", False):
        raise ValueError(
            "build_backbone never downloads weights (pretrained=True is not supported); build the model, "
            "then load a file with surgenet_ssl.models.weights.load_backbone_weights(model, source, backbone)."
        )
    kwargs = {"num_classes": 0, **timm_kwargs, "drop_path_rate": drop_path_rate}

    if name == "caformer_s18":
        if pretrained_variant == "SurgeNet":
            return surgenet_caformer_s18(**kwargs)
        return timm.create_model("caformer_s18", pretrained=False, **kwargs)
    if name == "timm":
        return timm.create_model(_check_timm_name(timm_name), pretrained=False, **kwargs)
    if pos_embed_resampling not in POS_EMBED_RESAMPLING:
        raise ValueError(f"pos_embed_resampling must be one of {POS_EMBED_RESAMPLING}, got {pos_embed_resampling!r}")
    model_name, extra = _TIMM_MODELS[name]
    model = timm.create_model(model_name, pretrained=False, **{**extra, **kwargs})
    if name in DINO_V1_VITS:
        torch.nn.init.trunc_normal_(cast(torch.Tensor, model.cls_token), std=0.02)  # official DINO: trunc_normal_
    if pos_embed_resampling == "official" and name in VIT_BACKBONES:
        use_official_pos_embed(model)
    if grad_checkpointing:
        cast(Any, model).set_grad_checkpointing(True)
    if drop_path_uniform:
        if name not in VIT_BACKBONES:
            raise ValueError(f"drop_path_uniform needs a ViT backbone ({', '.join(VIT_BACKBONES)}), not {name}")
        set_uniform_drop_path(model, drop_path_rate)
    return model


def backbone_num_features(model: torch.nn.Module) -> int:
    """Width of the pooled feature vector (for ``features_only`` models: channels of the last stage)."""
    feature_info = getattr(model, "feature_info", None)
    if feature_info is not None and hasattr(feature_info, "channels"):  # timm FeatureListNet / FeatureGetterNet
        return int(feature_info.channels()[-1])
    num_features = getattr(model, "num_features", None)
    if num_features is None:
        raise ValueError(f"{type(model).__name__} has no num_features attribute; is it a timm model?")
    return int(num_features)

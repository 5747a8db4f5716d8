"""Backbones: a timm-based registry, the SurgeNet CaFormer-S18 variant, SurgeNet <-> timm key conversion."""

from .convert import CONVERTIBLE_BACKBONES, detect_naming, surgenet_to_timm, timm_to_surgenet
from .registry import BACKBONES, SURGENET_BACKBONES, VARIANTS, backbone_num_features, build_backbone
from .vit import VIT_BACKBONES

__all__ = [
    "BACKBONES",
    "SURGENET_BACKBONES",
    "CONVERTIBLE_BACKBONES",
    "VARIANTS",
    "VIT_BACKBONES",
    "build_backbone",
    "backbone_num_features",
    "timm_to_surgenet",
    "surgenet_to_timm",
    "detect_naming",
]

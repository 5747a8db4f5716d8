"""Downstream models (classification, FPN segmentation) and the one backbone weight loader.

``from surgenet_ssl.models import caformer_s18, MetaFormerFPN, ...`` is a drop-in for the published SurgeNet
"Loading Models" snippet: same call signatures, any weight format, and a clear error instead of a silent no-op.
"""

from .classification import build_classifier, caformer_s18, convnextv2_tiny, pvt_v2_b2
from .fpn import PVTV2FPN, BackboneFPN, ConvNextFPN, FPNDecoder, MetaFormerFPN, ViTPyramid
from .weights import (
    LoadReport,
    cache_dir,
    download_weights,
    extract_backbone_state_dict,
    load_backbone_weights,
    read_state_dict,
)

__all__ = [
    "caformer_s18",
    "convnextv2_tiny",
    "pvt_v2_b2",
    "MetaFormerFPN",
    "ConvNextFPN",
    "PVTV2FPN",
    "BackboneFPN",
    "FPNDecoder",
    "ViTPyramid",
    "build_classifier",
    "LoadReport",
    "load_backbone_weights",
    "read_state_dict",
    "extract_backbone_state_dict",
    "download_weights",
    "cache_dir",
]

"""Downstream classification models with the published SurgeNet call signatures, built on timm.

``caformer_s18(num_classes=12, pretrained='SurgeNet', pretrained_weights=url)`` etc. behave like the published
builders, but load through ``load_backbone_weights`` (any format, never a silent no-op) and return timm models:
``num_classes=0`` gives the pooled, normalized backbone features (timm convention).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import nn

from surgenet_ssl.backbones import VARIANTS, build_backbone

from .weights import WeightSource, load_backbone_weights, read_state_dict

__all__ = ["build_classifier", "caformer_s18", "convnextv2_tiny", "pvt_v2_b2", "resolve_caformer_variant"]

_STARRELU = re.compile(r"\.act1?\.(scale|bias)$")


def resolve_caformer_variant(pretrained: str | None, weights: dict | None) -> str:
    """'SurgeNet' or 'ImageNet'. ``None`` infers it: StarReLU tensors in the weights mean ImageNet, else SurgeNet."""
    if pretrained is not None:
        if pretrained not in VARIANTS:
            choices = ", ".join(VARIANTS)
            raise ValueError(f"Unknown pretrained '{pretrained}' for caformer_s18. Valid choices: {choices}.")
        return pretrained
    if weights is not None and any(_STARRELU.search(k) for k in _all_keys(weights)):
        return "ImageNet"
    return "SurgeNet"


def _all_keys(obj) -> list[str]:
    """Keys of a (possibly nested) checkpoint dict, for variant inference only."""
    keys: list[str] = []
    for k, v in obj.items():
        if isinstance(v, Mapping):
            keys.extend(_all_keys(v))
        else:
            keys.append(str(k))
    return keys


def build_classifier(
    backbone: str,
    num_classes: int = 0,
    pretrained: str | None = None,
    pretrained_weights: WeightSource | None = None,
    **kwargs,
) -> nn.Module:
    """timm model for ``backbone`` with a ``num_classes`` head (0: pooled features), optionally pretrained.

    ``pretrained`` selects the CaFormer variant ('SurgeNet' ReLU / 'ImageNet' StarReLU; None: infer from the
    weights); it is ignored for the other backbones, which have one variant. ``kwargs`` go to timm
    (e.g. ``drop_path_rate``).
    """
    weights = read_state_dict(pretrained_weights) if pretrained_weights is not None else None
    variant = resolve_caformer_variant(pretrained, weights) if backbone == "caformer_s18" else "SurgeNet"
    model = build_backbone(backbone, pretrained_variant=variant, num_classes=num_classes, **kwargs)
    if weights is not None:
        name = None if isinstance(pretrained_weights, Mapping) else str(pretrained_weights)
        # keep what was loaded on the model, for logs and tests (a plain attribute: nn.Module's setattr is typed
        # for tensors and modules only)
        report = load_backbone_weights(model, weights, backbone, source_name=name)
        model.load_report = report  # type: ignore[assignment]
    return model


def caformer_s18(
    num_classes: int = 0,
    pretrained: str | None = None,
    pretrained_weights: WeightSource | None = None,
    **kwargs,
) -> nn.Module:
    """CaFormer-S18 classifier; ``pretrained``: 'SurgeNet' | 'ImageNet' (architecture variant, None = infer)."""
    return build_classifier("caformer_s18", num_classes, pretrained, pretrained_weights, **kwargs)


def convnextv2_tiny(
    num_classes: int = 0, pretrained_weights: WeightSource | None = None, pretrained: str | None = None, **kwargs
) -> nn.Module:
    """ConvNeXtV2-tiny classifier (published signature; ``pretrained`` is accepted like CaFormer's, one variant
    exists)."""
    return build_classifier("convnextv2_tiny", num_classes, pretrained, pretrained_weights, **kwargs)


def pvt_v2_b2(
    num_classes: int = 0, pretrained_weights: WeightSource | None = None, pretrained: str | None = None, **kwargs
) -> nn.Module:
    """PVTv2-b2 classifier (published signature; ``pretrained`` is accepted like CaFormer's, one variant exists)."""
    return build_classifier("pvt_v2_b2", num_classes, pretrained, pretrained_weights, **kwargs)

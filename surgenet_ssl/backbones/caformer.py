"""The SurgeNet CaFormer-S18 variant, built from timm's MetaFormer.

SurgeNet's CaFormer-S18 is not timm's ImageNet ``caformer_s18``: the published backbone uses plain ReLU
inside the separable-convolution token mixers (stages 1-2) and inside every MLP, where the ImageNet model
uses StarReLU (learnable scale/bias, 48 extra tensors). Everything else (bias-free LayerNorms, residual
scaling in stages 3-4, LayerNorm on the pooled output) is identical, so we reuse timm's ``MetaFormer`` class
and only swap the activations. Building through timm keeps ``features_only``, ``forward_intermediates``,
drop-path and the rest of timm's machinery available for free.
"""

from __future__ import annotations

import torch.nn as nn
from timm.models import build_model_with_cfg
from timm.models.metaformer import Attention, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer, SepConv

__all__ = ["SepConvReLU", "CAFORMER_S18_ARGS", "surgenet_caformer_s18"]


class SepConvReLU(SepConv):
    """timm's SepConv token mixer with ReLU after the first pointwise conv (SurgeNet), not StarReLU.

    A subclass, not ``functools.partial``: timm's MetaFormerStage calls ``issubclass(token_mixer, Attention)``
    to decide the tensor layout, which needs a real class.
    """

    def __init__(self, dim: int, act1_layer: type[nn.Module] = nn.ReLU, **kwargs):
        super().__init__(dim, act1_layer=act1_layer, **kwargs)


# Architecture of caformer_s18 (same numbers as timm's registered model), with SurgeNet's activations.
CAFORMER_S18_ARGS = dict(
    depths=(3, 3, 9, 3),
    dims=(64, 128, 320, 512),
    token_mixers=[SepConvReLU, SepConvReLU, Attention, Attention],
    norm_layers=[LayerNorm2dNoBias] * 2 + [LayerNormNoBias] * 2,
    mlp_act=nn.ReLU,
)


def surgenet_caformer_s18(**kwargs) -> MetaFormer:
    """Randomly initialised SurgeNet CaFormer-S18 (ReLU variant); kwargs go to timm (num_classes,
    drop_path_rate, features_only, out_indices, ...). Never downloads weights."""
    if kwargs.pop("pretrained", False):
        raise ValueError("surgenet_caformer_s18 never downloads weights; use load_backbone_weights() instead.")
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        MetaFormer,
        "caformer_s18",  # reuse timm's pretrained_cfg (input size, mean/std); weights are never fetched
        pretrained=False,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **{**CAFORMER_S18_ARGS, **kwargs},
    )

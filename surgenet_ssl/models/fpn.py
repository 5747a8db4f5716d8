"""FPN semantic segmentation on the four backbone stages, as released with SurgeNet (SURGENET.md section 6).

Encoder: a timm feature extractor (``FeatureListNet``, what ``features_only=True`` builds) giving the stages at
strides 4, 8, 16, 32. The weights are loaded into the full backbone *before* it is wrapped (what timm does for
``features_only`` too), so every file format of ``load_backbone_weights`` works and nothing is renamed.

ViT backbones (``vit_small``, ``dinov2_vitb14_reg4``, ...; no stages at strides 4-32): :class:`ViTPyramid`, a
simple feature pyramid (ViTDet-like, without learned layers): the patch tokens of four evenly spaced blocks (timm's
``forward_intermediates``, NCHW at the patch stride) resized bilinearly to strides 4, 8, 16, 32, shallow to deep.

Decoder: 1x1 lateral convs to 256 channels with a nearest x2 top-down path; per level 3x3 conv + GroupNorm(32) +
ReLU blocks with bilinear x2 upsampling until stride 4 at 128 channels; the four levels concatenated (512);
a 3x3 conv to the classes; bilinear x4 upsampling to the input size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from timm.models import FeatureListNet
from torch import Tensor, nn

from surgenet_ssl.backbones import build_backbone

from .classification import resolve_caformer_variant
from .weights import WeightSource, load_backbone_weights, read_state_dict

__all__ = ["FPNDecoder", "BackboneFPN", "MetaFormerFPN", "ConvNextFPN", "PVTV2FPN", "ViTPyramid"]


class ConvGNReLU(nn.Sequential):
    """3x3 conv (no bias) + GroupNorm(32) + ReLU, optionally followed by bilinear x2 upsampling."""

    def __init__(self, in_channels: int, out_channels: int, upsample: bool):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(32, out_channels),
            nn.ReLU(inplace=True),
        )
        self.upsample = upsample

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True) if self.upsample else x


class FPNDecoder(nn.Module):
    """Four feature maps (strides 4, 8, 16, 32) -> class logits at stride 4 (upsampled by the caller)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        pyramid_channels: int = 256,
        segmentation_channels: int = 128,
        dropout: float = 0.0,
    ):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"FPNDecoder needs 4 feature levels (strides 4-32), got channels {list(in_channels)}.")
        self.lateral = nn.ModuleList(nn.Conv2d(c, pyramid_channels, kernel_size=1) for c in in_channels)
        # level i (stride 4 * 2**i) needs i bilinear x2 upsamplings to reach stride 4
        self.smooth = nn.ModuleList(
            nn.Sequential(
                ConvGNReLU(pyramid_channels, segmentation_channels, upsample=level > 0),
                *(ConvGNReLU(segmentation_channels, segmentation_channels, upsample=True) for _ in range(level - 1)),
            )
            for level in range(4)
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(4 * segmentation_channels, num_classes, kernel_size=3, padding=1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        pyramid = [self.lateral[3](features[3])]
        for level in (2, 1, 0):  # top-down: nearest x2 + lateral
            top_down = F.interpolate(pyramid[0], scale_factor=2.0, mode="nearest")
            pyramid.insert(0, top_down + self.lateral[level](features[level]))
        merged = torch.cat([block(p) for block, p in zip(self.smooth, pyramid, strict=True)], dim=1)
        return self.classifier(self.dropout(merged))


def _stride_4_to_32(model: nn.Module) -> tuple[int, ...]:
    """Indices of the feature stages at strides 4, 8, 16, 32 (the last stage of each stride): (0, 1, 2, 3) for the
    SurgeNet backbones; (1, 2, 3, 4) for models with a stride-2 stem stage (ResNets, EfficientNets)."""
    info = getattr(model, "feature_info", None)
    if not info:
        return (0, 1, 2, 3)
    last = {int(f["reduction"]): i for i, f in enumerate(info)}
    return tuple(last[r] for r in (4, 8, 16, 32)) if all(r in last for r in (4, 8, 16, 32)) else (0, 1, 2, 3)


def _is_vit(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("patch_embed", "blocks", "forward_intermediates"))


class ViTPyramid(nn.Module):
    """A timm ViT as a four-level encoder: the patch tokens after blocks ``indices`` (default: four evenly spaced,
    the last one included; the final norm applied), each resized bilinearly to 1/4, 1/8, 1/16, 1/32 of the input
    (shallow to deep). ``feature_info``-like ``channels()`` / ``reduction()`` for the decoder."""

    def __init__(self, vit: nn.Module, indices: Sequence[int] | None = None) -> None:
        super().__init__()
        depth = len(cast("nn.Sequential", vit.blocks))
        if indices is None:
            indices = sorted({max(0, round(depth * (i + 1) / 4) - 1) for i in range(4)})
        if len(indices) != 4:
            raise ValueError(f"ViTPyramid needs 4 distinct block indices, got {list(indices)} (depth {depth})")
        self.vit, self.indices = vit, [int(i) for i in indices]
        dim = int(cast("int", vit.embed_dim))
        self._channels, self._reductions = [dim] * 4, [4, 8, 16, 32]

    def channels(self) -> list[int]:
        return list(self._channels)

    def reduction(self) -> list[int]:
        return list(self._reductions)

    def forward(self, x: Tensor) -> list[Tensor]:
        h, w = x.shape[-2:]
        vit: Any = self.vit  # a timm ViT: forward_intermediates is not nn.Module's
        maps = vit.forward_intermediates(x, indices=self.indices, norm=True, output_fmt="NCHW", intermediates_only=True)
        return [
            F.interpolate(m, size=(h // r, w // r), mode="bilinear", align_corners=False)
            for m, r in zip(maps, self._reductions, strict=True)
        ]


class BackboneFPN(nn.Module):
    """Segmentation model: timm backbone stages -> ``FPNDecoder`` -> logits ``(B, num_classes, H, W)``.

    ``H`` and ``W`` must be divisible by 32 (the deepest stride). A ViT backbone goes through :class:`ViTPyramid`
    (``vit_indices``: the four blocks; build it at the downstream size with ``img_size=...``: the loaded position
    table is resampled to that grid, the official way; other sizes are resampled at run time by timm).
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int = 1,
        pretrained: str | None = None,
        pretrained_weights: WeightSource | None = None,
        vit_indices: Sequence[int] | None = None,
        **kwargs,
    ):
        super().__init__()
        weights = read_state_dict(pretrained_weights) if pretrained_weights is not None else None
        variant = resolve_caformer_variant(pretrained, weights) if backbone == "caformer_s18" else "SurgeNet"
        model = build_backbone(backbone, pretrained_variant=variant, num_classes=0, **kwargs)
        self.load_report = None
        if weights is not None:
            name = None if isinstance(pretrained_weights, Mapping) else str(pretrained_weights)
            self.load_report = load_backbone_weights(model, weights, backbone, source_name=name)
        self.encoder: nn.Module
        if _is_vit(model):
            self.encoder = ViTPyramid(model, vit_indices)
            self.decoder = FPNDecoder(self.encoder.channels(), num_classes)
            return
        out_indices = _stride_4_to_32(model)
        try:
            self.encoder = FeatureListNet(model, out_indices=out_indices, flatten_sequential=True)
        except AssertionError:  # stages named by a Sequential itself (ResNet 'layer1'): timm's unflattened wrapper
            self.encoder = FeatureListNet(model, out_indices=out_indices, flatten_sequential=False)
        info = cast("Any", self.encoder).feature_info
        reductions = info.reduction()
        if reductions != [4, 8, 16, 32]:
            raise ValueError(f"{backbone} stages have strides {reductions}; the FPN needs 4, 8, 16, 32.")
        self.decoder = FPNDecoder(info.channels(), num_classes)

    def forward_features_list(self, x: Tensor) -> list[Tensor]:
        """The four stage outputs (NCHW), as the published models' ``forward_features_list``."""
        return self.encoder(x)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(f"Input size {h}x{w} is not divisible by 32; resize or pad the image (e.g. to 512x640).")
        logits = self.decoder(self.encoder(x))
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=True)


class MetaFormerFPN(BackboneFPN):
    """CaFormer-S18 FPN; ``pretrained``: 'SurgeNet' | 'ImageNet' (architecture variant, None = infer)."""

    def __init__(
        self,
        num_classes: int = 1,
        pretrained: str | None = None,
        pretrained_weights: WeightSource | None = None,
        **kwargs,
    ):
        super().__init__("caformer_s18", num_classes, pretrained, pretrained_weights, **kwargs)


class ConvNextFPN(BackboneFPN):
    """ConvNeXtV2-tiny FPN (published signature)."""

    def __init__(
        self,
        num_classes: int = 1,
        pretrained_weights: WeightSource | None = None,
        pretrained: str | None = None,
        **kwargs,
    ):
        super().__init__("convnextv2_tiny", num_classes, pretrained, pretrained_weights, **kwargs)


class PVTV2FPN(BackboneFPN):
    """PVTv2-b2 FPN (published signature)."""

    def __init__(
        self,
        num_classes: int = 1,
        pretrained_weights: WeightSource | None = None,
        pretrained: str | None = None,
        **kwargs,
    ):
        super().__init__("pvt_v2_b2", num_classes, pretrained, pretrained_weights, **kwargs)

"""Backbone + head over a list of crops, with one backbone pass per crop resolution."""

from __future__ import annotations

import torch
from torch import nn


class MultiCropWrapper(nn.Module):
    """Runs the backbone once per run of consecutive same-size crops (2 global, then N local), then the head once.

    Batching crops of equal size into one pass is what makes multi-crop affordable; the head sees all crops at once.
    The output rows are ordered crop by crop: rows [i*B, (i+1)*B) belong to crop i.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        features = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(features))

"""The DINO projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes layer."""

from __future__ import annotations

import math
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for this device type (False for types autocast does not know, e.g. ``meta``)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| (per output row).

    Written out instead of ``torch.nn.utils.weight_norm`` so that the parameter names are the official DINO ones
    (``weight_g``, ``weight_v``) on every PyTorch version, and so a full checkpoint matches the official layout.
    """

    def __init__(self, in_dim: int, out_dim: int, fix_norm: bool = True) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_norm)
        # nn.Linear's default init, as the official head (weight_norm of a fresh nn.Linear): rows of norm ~0.58.
        # trunc_normal(0.02) would give 0.32 and, since the effective weight is v / ||v||, ~1.8x faster prototype
        # rotation per update early in training.
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """in_dim -> hidden -> ... -> bottleneck (GELU between), L2-normalise, then the prototypes layer.

    With ``norm_last_layer=True`` (the recipe) the prototype norms stay fixed at 1, which stabilises training.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        fp32_head: bool = True,
    ) -> None:
        super().__init__()
        self.fp32_head = fp32_head
        if nlayers < 1:
            raise ValueError(f"DINOHead needs nlayers >= 1, got {nlayers}")
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        for i, (d_in, d_out) in enumerate(pairwise(dims)):
            layers.append(nn.Linear(d_in, d_out))
            if i < nlayers - 1:
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
        self.mlp = layers[0] if len(layers) == 1 else nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32_head and _autocast_on(x.device.type):
            # The prototype logits are cosines divided by a teacher temperature of 0.04: bf16's 8-bit mantissa in the
            # MLP and the prototypes moves teacher probabilities by several percent (tests/dino/test_head_precision.py).
            # The whole head runs in fp32: ~22 MFLOPs per crop at the recipe's sizes, under 1% of a CaFormer-S18 step.
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self._forward(x.float())
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)

"""Batched DINO multi-crop augmentation on the training device (``data.augment_on=gpu``).

Why: with the CPU pipeline the loader workers, not the accelerator, limit throughput on most nodes. In GPU mode the
workers only decode and resize frames to a fixed size (:class:`surgenet_ssl.data.augment.FrameResize`); this module
turns a uint8 batch ``(B, 3, H, W)`` into the 2 + N crops of the recipe with a handful of batched kernels:

- random resized crop: the torchvision parameter distribution drawn per sample (10 attempts, then the central
  fallback), sampled with ``torchvision.ops.roi_align`` (bilinear, averaging ``ceil(crop/out)`` points per output
  pixel, i.e. antialiased when shrinking; the official recipe uses PIL bicubic);
- flip, colour jitter with an independent random order of the four ops per sample (torchvision semantics on
  [0, 1] floats), grayscale, Gaussian blur with a per-sample sigma (separable grouped convolution), solarization;
- ImageNet normalisation.

Device-agnostic (CPU tensors in the tests). Random numbers come from a ``torch.Generator`` on the batch's device.
Call with ``return_params=True`` to get the drawn parameters (per crop index, tensors over the batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from surgenet_ssl.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    JITTER,
    RATIO,
    SIGMA,
    CropGeometry,
    recipe_probabilities,
)

__all__ = ["GpuMultiCrop", "adjust_hue", "random_resized_boxes", "rgb_to_gray"]

_LUMA = (0.299, 0.587, 0.114)


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) -> (B,1,H,W) luma (ITU-R 601, as PIL and torchvision)."""
    return (_LUMA[0] * x[:, 0:1] + _LUMA[1] * x[:, 1:2] + _LUMA[2] * x[:, 2:3]).to(x.dtype)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (other + factor.view(-1, 1, 1, 1) * (x - other)).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, rgb_to_gray(x), f)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shift`` (fraction of the circle, per sample) via HSV, as torchvision's tensor path."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h))
    h = torch.remainder(h + shift.view(-1, 1, 1), 1.0)
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    h6, vs = h * 6.0, maxc * s
    # HSV -> RGB without branches: channel = v - v*s*clamp(min(k, 4-k), 0, 1), k = (n + 6h) mod 6, n = 5, 3, 1
    out = [maxc - vs * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
           for k in (torch.remainder(n + h6, 6.0) for n in (5.0, 3.0, 1.0))]  # fmt: skip
    return torch.stack(out, 1).clamp_(0.0, 1.0)


_JITTER_FNS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def random_resized_boxes(
    n: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float], generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:  # fmt: skip
    """Per-sample torchvision RandomResizedCrop boxes ``(n, 4)`` as ``(top, left, h, w)`` (long), all at once."""
    area = height * width
    u = torch.rand(n, 10, 2, generator=generator, device=device, dtype=torch.float64)
    target = area * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + u[..., 1] * (hi - lo))
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(ok.to(torch.int8), dim=1)  # first valid attempt (0 if none; masked below)
    any_ok = ok.any(dim=1)
    w = w.gather(1, first[:, None]).squeeze(1)
    h = h.gather(1, first[:, None]).squeeze(1)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    w = torch.where(any_ok, w, torch.full_like(w, max(1, fw)))
    h = torch.where(any_ok, h, torch.full_like(h, max(1, fh)))
    pos = torch.rand(n, 2, generator=generator, device=device, dtype=torch.float64)
    top = torch.minimum((pos[:, 0] * (height - h + 1)).long(), height - h)
    left = torch.minimum((pos[:, 1] * (width - w + 1)).long(), width - w)
    top = torch.where(any_ok, top, (height - h) // 2)
    left = torch.where(any_ok, left, (width - w) // 2)
    return torch.stack([top, left, h, w], 1)


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(n, 2*radius+1) normalised 1-D Gaussian kernels; sigma <= 0 gives the identity kernel."""
    x = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    s = sigma.clamp(min=1e-3).float().view(-1, 1)
    k = torch.exp(-0.5 * (x / s) ** 2)
    k = k / k.sum(dim=1, keepdim=True)
    identity = (x == 0).float().expand_as(k)
    return torch.where((sigma > 0).view(-1, 1), k, identity)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int | None = None) -> torch.Tensor:
    """Per-sample separable Gaussian blur of (B,C,H,W) with std ``sigma`` (B,) px; edges replicated."""
    b, c, h, w = x.shape
    radius = radius if radius is not None else math.ceil(3.0 * float(SIGMA[1]))
    radius = min(radius, h - 1, w - 1) if min(h, w) > 1 else 0
    if radius == 0:
        return x
    k = _gaussian_kernels(sigma, radius).to(x.dtype)  # (B, K)
    kk = k.repeat_interleave(c, dim=0)  # (B*C, K)
    y = x.reshape(1, b * c, h, w)
    y = F.pad(y, (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, kk.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, kk.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, h, w)


class GpuMultiCrop(CropGeometry):
    """uint8 frames ``(B, 3, H, W)`` on any device -> list of ``2 + local_crops_number`` normalised float crops.

    Args mirror :class:`surgenet_ssl.data.augment.MultiCropAugmentation`; ``probabilities`` overrides ``flip``,
    ``jitter``, ``gray``, ``blur`` (3-tuple), ``solarize`` (tests only); ``dtype`` of the output crops.
    """

    def __init__(
        self,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        global_crops_scale: Sequence[float] = (0.4, 1.0),
        local_crops_scale: Sequence[float] = (0.05, 0.4),
        local_crops_number: int = 8,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        probabilities: dict[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self._init_geometry(global_crops_size, local_crops_size, global_crops_scale, local_crops_scale,
                            local_crops_number, mean, std)  # fmt: skip
        self.p, self.dtype = recipe_probabilities(probabilities), dtype

    def _crop(self, x: torch.Tensor, index: int, g: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b, _, height, width = x.shape
        dev = x.device
        is_global = index < 2
        size = self.global_crops_size if is_global else self.local_crops_size
        scale = self.global_crops_scale if is_global else self.local_crops_scale
        boxes = random_resized_boxes(b, height, width, scale, RATIO, g, dev)
        top, left, h, w = boxes.unbind(1)
        rois = torch.stack(
            [torch.arange(b, device=dev, dtype=torch.float32), left.float(), top.float(),
             (left + w).float(), (top + h).float()], 1,
        )  # fmt: skip
        # Bilinear sampling averaging ceil(crop/out) points per bin in each direction: antialiased shrinking.
        ratio = math.ceil(float((torch.maximum(h, w).max()).item()) / size) if b else 1
        out = roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=max(1, ratio),
                        aligned=True)  # fmt: skip
        out = out.clamp_(0.0, 1.0)
        u = torch.rand(b, 8, generator=g, device=dev)
        flip = u[:, 0] < self.p["flip"]
        out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
        jitter = u[:, 1] < self.p["jitter"]
        bri, con, sat, hue = JITTER
        factors = torch.stack(
            [1 - bri + 2 * bri * u[:, 2], 1 - con + 2 * con * u[:, 3], 1 - sat + 2 * sat * u[:, 4],
             -hue + 2 * hue * u[:, 5]], 1,
        )  # fmt: skip
        order = torch.argsort(torch.rand(b, 4, generator=g, device=dev), dim=1)  # random permutation per sample
        for position in range(4):
            for op in range(4):
                sel = (jitter & (order[:, position] == op)).nonzero().squeeze(1)
                if sel.numel():
                    out[sel] = _JITTER_FNS[op](out[sel], factors[sel, op])
        gray = u[:, 6] < self.p["gray"]
        out = torch.where(gray.view(-1, 1, 1, 1), rgb_to_gray(out).expand_as(out), out)
        blur_p = self.p["blur"][min(index, 2)]
        v = torch.rand(b, 3, generator=g, device=dev)
        blur = v[:, 0] < blur_p
        sigma = torch.where(blur, SIGMA[0] + v[:, 1] * (SIGMA[1] - SIGMA[0]), torch.zeros_like(v[:, 1]))
        if bool(blur.any()):
            out = gaussian_blur(out, sigma)
        sol = (v[:, 2] < self.p["solarize"]) if index == 1 else torch.zeros_like(blur)
        if bool(sol.any()):
            out = torch.where(sol.view(-1, 1, 1, 1) & (out >= 128.0 / 255.0), 1.0 - out, out)
        mean = torch.tensor(self.mean, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=dev).view(1, 3, 1, 1)
        out = ((out - mean) / std).to(self.dtype)
        params = {"box": boxes, "flip": flip, "jitter": jitter, "factors": factors, "order": order, "gray": gray,
                  "blur": blur, "sigma": sigma, "solarize": sol}  # fmt: skip
        return out, params

    @torch.no_grad()
    def __call__(
        self,
        frames: torch.Tensor,
        generator: torch.Generator | None = None,
        return_params: bool = False,
    ) -> Any:
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"expected uint8 frames (B, 3, H, W), got shape {tuple(frames.shape)}")
        x = frames.float().div_(255.0) if frames.dtype == torch.uint8 else frames.float()
        if generator is None:
            generator = torch.Generator(device=frames.device)
            generator.seed()
        crops, params = [], []
        for i in range(self.n_crops):
            c, p = self._crop(x, i, generator)
            crops.append(c)
            params.append(p)
        return (crops, params) if return_params else crops

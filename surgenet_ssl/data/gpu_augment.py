"""Batched DINO multi-crop augmentation on the training device (``data.augment_on=gpu``).

Why: with the CPU pipeline the loader workers, not the accelerator, limit throughput on most nodes. In GPU mode the
workers only decode frames and fit them, aspect kept, into a fixed canvas (:class:`surgenet_ssl.data.augment.
FrameResize`, which also ships each frame's valid ``(h, w)``); this module turns a uint8 batch ``(B, 3, H, W)`` into
the 2 + N crops of the recipe with a handful of batched kernels:

- random resized crop: the torchvision parameter distribution drawn per sample *within that sample's valid
  region* (10 attempts, then the central fallback), so 4:3, 5:4, square and 16:9 frames in one batch each get the
  recipe's crop area/aspect distribution; sampled with ``torchvision.ops.roi_align`` (bilinear, adaptive
  ``ceil(crop/out)`` points per output pixel and ROI, i.e. antialiased when shrinking; the official recipe uses PIL
  bicubic);
- flip, colour jitter with an independent random order of the four ops per sample (torchvision semantics on
  [0, 1] floats), grayscale, Gaussian blur with a per-sample sigma (separable grouped convolution), solarization;
- ImageNet normalisation.

No host synchronisation in the per-step path: no ``.item()``, ``.tolist()``, ``nonzero()``, ``bool(tensor)`` or
host-to-device copies; per-sample choices are ``torch.where`` selections (the jitter runs each op position over
the whole batch), constants are cached per device. Device-agnostic (CPU tensors in the tests). Random numbers come
from the ``torch.Generator`` passed in (the training module keeps one per rank). Call with ``return_params=True``
to get the drawn parameters (per crop index, tensors over the batch).
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
    RATIO,
    SIGMA,
    CropGeometry,
    recipe_probabilities,
)

__all__ = ["GpuMultiCrop", "adjust_hue", "normalize_uint8", "random_resized_boxes", "rgb_to_gray"]

_LUMA = (0.299, 0.587, 0.114)
_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _constants(
    device: torch.device,
    mean: Sequence[float],
    std: Sequence[float],
    uint8: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-device cached (1,3,1,1) float32 constants, created once instead of one host copy per crop:
    ``(1/(255 std), -mean/std)`` for uint8 input, ``(mean, std)`` for [0, 1] floats."""
    key = (str(device), tuple(mean), tuple(std), uint8)
    if key not in _CONSTANTS:
        m, sd = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
        pair = ((1.0 / (255.0 * sd)).float(), (-m / sd).float()) if uint8 else (m.float(), sd.float())
        _CONSTANTS[key] = (pair[0].view(1, 3, 1, 1).to(device), pair[1].view(1, 3, 1, 1).to(device))
    return _CONSTANTS[key]


def normalize_uint8(
    x: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 crops ``(B,3,h,w)`` (0..255) -> ``(x/255 - mean)/std`` in ``dtype``, on ``x``'s device.

    The same arithmetic as the fast CPU backend's float output (``x * 1/(255 std) - mean/std``), so uint8 crops
    shipped by the loader and normalised here after the transfer equal the worker-normalised ones.
    """
    scale, shift = _constants(x.device, mean, std, uint8=True)
    return torch.addcmul(shift, x.float(), scale).to(dtype)


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
    out = [
        maxc - vs * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
        for k in (torch.remainder(n + h6, 6.0) for n in (5.0, 3.0, 1.0))
    ]
    return torch.stack(out, 1).clamp_(0.0, 1.0)


_JITTER_FNS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _per_sample(v: int | torch.Tensor, n: int, device: torch.device | str) -> torch.Tensor:
    """A size given as an int or an (n,) tensor -> (n,) float64 tensor on ``device`` (``full``: no host copy)."""
    if isinstance(v, torch.Tensor):
        return v.to(device=device, dtype=torch.float64).reshape(n)
    return torch.full((n,), float(v), device=device, dtype=torch.float64)


def random_resized_boxes(
    n: int,
    height: int | torch.Tensor,
    width: int | torch.Tensor,
    scale: Sequence[float],
    ratio: Sequence[float],
    generator: torch.Generator,
    device: torch.device | str,
) -> torch.Tensor:
    """Per-sample torchvision RandomResizedCrop boxes ``(n, 4)`` as ``(top, left, h, w)`` (long), all at once.

    ``height``/``width``: the frame size, one int for all samples or an (n,) tensor of per-sample valid sizes.
    """
    hgt, wid = _per_sample(height, n, device), _per_sample(width, n, device)
    area = (hgt * wid)[:, None]
    u = torch.rand(n, 10, 2, generator=generator, device=device, dtype=torch.float64)
    target = area * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + u[..., 1] * (hi - lo))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= wid[:, None]) & (h > 0) & (h <= hgt[:, None])
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)  # first valid attempt (0 if none; masked below)
    any_ok = ok.any(dim=1)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # Central fallback (torchvision): the whole frame, or its central part of the nearest allowed aspect.
    in_ratio = wid / hgt
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fw = torch.where(wide, torch.round(hgt * max(ratio)), wid).clamp(min=1)
    fh = torch.where(narrow, torch.round(wid / min(ratio)), hgt).clamp(min=1)
    w, h = torch.where(any_ok, w, fw), torch.where(any_ok, h, fh)
    pos = torch.rand(n, 2, generator=generator, device=device, dtype=torch.float64)
    top = torch.minimum(torch.floor(pos[:, 0] * (hgt - h + 1)), hgt - h)
    left = torch.minimum(torch.floor(pos[:, 1] * (wid - w + 1)), wid - w)
    top = torch.where(any_ok, top, torch.floor((hgt - h) / 2))
    left = torch.where(any_ok, left, torch.floor((wid - w) / 2))
    return torch.stack([top, left, h, w], 1).long()


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


def replicate_edges(x: torch.Tensor, hw: torch.Tensor) -> torch.Tensor:
    """Copy each sample's last valid column/row into the first padding column/row (``hw``: (B, 2) valid sizes).

    Bilinear sampling near a crop's right/bottom edge reads half a pixel beyond the valid region: with this it
    reads the edge pixel, as ``roi_align`` clamps at the border of an unpadded frame.
    """
    b, c, height, width = x.shape
    h, w = hw[:, 0].long(), hw[:, 1].long()
    src = (w - 1).clamp(0, width - 1).view(b, 1, 1, 1).expand(b, c, height, 1)
    dst = w.clamp(0, width - 1).view(b, 1, 1, 1).expand(b, c, height, 1)
    x = x.scatter(3, dst, x.gather(3, src))
    src = (h - 1).clamp(0, height - 1).view(b, 1, 1, 1).expand(b, c, 1, width)
    dst = h.clamp(0, height - 1).view(b, 1, 1, 1).expand(b, c, 1, width)
    return x.scatter(2, dst, x.gather(2, src))


def color_jitter(x: torch.Tensor, apply: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision ColorJitter per sample: the four ops in each sample's own ``order`` where ``apply``.

    ``factors`` (B, 4): brightness, contrast, saturation factors and hue shift; ``order`` (B, 4): a permutation of
    0..3 per sample. Each position runs over the whole batch and ``torch.where`` keeps each sample's op: no
    data-dependent indexing, so no host synchronisation (the hue is computed four times, the price of that).
    """
    for position in range(4):
        op = order[:, position]
        gray = rgb_to_gray(x)
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        zero = torch.zeros_like(mean)
        other = torch.where((op == 1).view(-1, 1, 1, 1), mean, torch.where((op == 2).view(-1, 1, 1, 1), gray, zero))
        factor = factors.gather(1, op.clamp(max=2).view(-1, 1)).view(-1, 1, 1, 1)
        blended = (other + factor * (x - other)).clamp_(0.0, 1.0)
        hue = adjust_hue(x, factors[:, 3])
        new = torch.where((op == 3).view(-1, 1, 1, 1), hue, blended)
        x = torch.where(apply.view(-1, 1, 1, 1), new, x)
    return x


class GpuMultiCrop(CropGeometry):
    """uint8 frames ``(B, 3, H, W)`` on any device -> list of ``2 + local_crops_number`` normalised float crops.

    Args mirror :class:`surgenet_ssl.data.augment.MultiCropAugmentation`; ``probabilities`` (training:
    ``recipe_from_crops(dino.crops)``, strengths included, see ``recipe_probabilities``) overrides ``flip``,
    ``jitter``, ``gray``, ``blur`` (3-tuple), ``solarize``; ``dtype`` of the output crops.
    Call with ``sizes`` ((B, 2) valid ``(h, w)`` per frame, top-left aligned in the padded canvas) to crop each
    frame within its own region; without, every frame is the whole canvas.
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
        self._init_geometry(
            global_crops_size, local_crops_size, global_crops_scale, local_crops_scale, local_crops_number, mean, std
        )
        self.p, self.dtype = recipe_probabilities(probabilities), dtype

    def _crop(
        self,
        x: torch.Tensor,
        index: int,
        g: torch.Generator,
        sizes: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b, _, height, width = x.shape
        dev = x.device
        is_global = index < 2
        size = self.global_crops_size if is_global else self.local_crops_size
        scale = self.global_crops_scale if is_global else self.local_crops_scale
        hgt, wid = (height, width) if sizes is None else (sizes[:, 0], sizes[:, 1])
        boxes = random_resized_boxes(b, hgt, wid, scale, RATIO, g, dev)
        top, left, h, w = boxes.float().unbind(1)
        rois = torch.stack([torch.arange(b, device=dev, dtype=torch.float32), left, top, left + w, top + h], 1)
        # sampling_ratio=0: ceil(box/out) bilinear points per output pixel, chosen per box inside the kernel.
        out = roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)
        out = out.clamp_(0.0, 1.0)
        # the per-crop draws, named after the recipe step that uses each (one (b, 8) draw: same seed, same crops)
        flip_u, jitter_u, bri_u, con_u, sat_u, hue_u, gray_u, _ = torch.rand(b, 8, generator=g, device=dev).unbind(1)
        flip = flip_u < self.p["flip"]
        out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
        jitter = jitter_u < self.p["jitter"]
        bri, con, sat, hue = self.p["jitter_strength"]  # dino.crops.color_jitter (recipe: JITTER)
        factors = torch.stack(
            [
                1 - bri + 2 * bri * bri_u,
                1 - con + 2 * con * con_u,
                1 - sat + 2 * sat * sat_u,
                -hue + 2 * hue * hue_u,
            ],
            1,
        )
        order = torch.argsort(torch.rand(b, 4, generator=g, device=dev), dim=1)  # random permutation per sample
        if self.p["jitter"] > 0:
            out = color_jitter(out, jitter, factors, order)
        gray = gray_u < self.p["gray"]
        if self.p["gray"] > 0:
            out = torch.where(gray.view(-1, 1, 1, 1), rgb_to_gray(out).expand_as(out), out)
        blur_p = self.p["blur"][min(index, 2)]
        blur_u, sigma_u, solarize_u = torch.rand(b, 3, generator=g, device=dev).unbind(1)
        blur = blur_u < blur_p
        lo, hi = self.p["blur_sigma"]  # dino.crops.blur_sigma (recipe: SIGMA)
        sigma = torch.where(blur, lo + sigma_u * (hi - lo), torch.zeros_like(sigma_u))
        if blur_p > 0:
            out = gaussian_blur(out, sigma, radius=math.ceil(3.0 * hi))  # sigma 0 (not drawn): identity kernel
        sol = (solarize_u < self.p["solarize"]) if index == 1 else torch.zeros_like(blur)
        if index == 1 and self.p["solarize"] > 0:
            threshold = self.p["solarize_threshold"] / 255.0  # dino.crops.solarize_threshold (recipe: 128)
            out = torch.where(sol.view(-1, 1, 1, 1) & (out >= threshold), 1.0 - out, out)
        mean, std = _constants(dev, self.mean, self.std, uint8=False)
        out = ((out - mean) / std).to(self.dtype)
        params = {
            "box": boxes,
            "flip": flip,
            "jitter": jitter,
            "factors": factors,
            "order": order,
            "gray": gray,
            "blur": blur,
            "sigma": sigma,
            "solarize": sol,
        }
        if sizes is not None:
            params["frame_hw"] = sizes
        return out, params

    @torch.no_grad()
    def __call__(
        self,
        frames: torch.Tensor,
        generator: torch.Generator | None = None,
        return_params: bool = False,
        sizes: torch.Tensor | None = None,
    ) -> Any:
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"expected uint8 frames (B, 3, H, W), got shape {tuple(frames.shape)}")
        if sizes is not None and tuple(sizes.shape) != (frames.shape[0], 2):
            raise ValueError(f"sizes must be (B, 2) valid (h, w) per frame, got shape {tuple(sizes.shape)}")
        x = frames.float().div_(255.0) if frames.dtype == torch.uint8 else frames.float()
        if sizes is not None:
            sizes = sizes.to(device=frames.device, dtype=torch.long)
            x = replicate_edges(x, sizes)
        if generator is None:
            generator = torch.Generator(device=frames.device)
            generator.seed()
        crops, params = [], []
        for i in range(self.n_crops):
            c, p = self._crop(x, i, generator, sizes)
            crops.append(c)
            params.append(p)
        return (crops, params) if return_params else crops

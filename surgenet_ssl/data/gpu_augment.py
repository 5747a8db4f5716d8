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
host-to-device copies; per-sample choices are ``torch.where`` selections or per-row coefficients, constants are
cached per device. Device-agnostic (CPU tensors in the tests). Random numbers come from the ``torch.Generator``
passed in (the training module keeps one per rank). Call with ``return_params=True`` to get the drawn parameters
(per crop index, tensors over the batch).

Few ops per call, whatever the batch: on a GPU every ATen op is a kernel launch paid in host time that cannot
overlap with the step. The two global crops of the batch are one tensor of ``2B`` rows and all local crops one of
``N*B`` rows (row ``i*B + b``: crop ``i`` of frame ``b``), each op runs once per group with per-row parameters
(crop boxes, flip, jitter factors and order, grayscale, blur sigma, solarization): about 400 ops per call instead
of one pass per crop (~5,100). ``scripts/bench_gpu_augment.py`` counts them.
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
_CONSTANTS: dict[tuple, Any] = {}


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


def _cached(key: tuple, make: Any) -> torch.Tensor:
    """A small constant tensor per key (device included), created once instead of one host copy per call."""
    if key not in _CONSTANTS:
        _CONSTANTS[key] = make()
    return _CONSTANTS[key]


def _luma(device: torch.device) -> torch.Tensor:
    return _cached(("luma", str(device)), lambda: torch.tensor(_LUMA).view(1, 3, 1, 1).to(device))


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
    """(B,3,H,W) -> (B,1,H,W) luma (ITU-R 601, as PIL and torchvision); two ops."""
    return (x * _luma(x.device).to(x.dtype)).sum(dim=1, keepdim=True)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shift`` (fraction of the circle, per sample) via HSV, as torchvision's tensor path.

    In sixths of the circle throughout (``h6``), with the hue's sector chosen by the first maximal channel (red,
    then green, then blue: torchvision's priority) and HSV -> RGB without branches: channel = v - (v - min) *
    clamp(min(k, 4 - k), 0, 1), k = (n + h6) mod 6, n = 5, 3, 1 (about 20 ops)."""
    maxc, first = x.max(dim=1, keepdim=True)  # the first maximal channel (documented for max over a dim)
    delta = maxc - x.amin(dim=1, keepdim=True)
    coloured = delta > 0
    c = (maxc - x) / torch.where(coloured, delta, 1.0)  # (rc, gc, bc)
    sectors = (
        c.roll(1, dims=1)
        - c.roll(-1, dims=1)
        + _cached(
            ("hue_offsets", str(x.device), x.dtype),
            lambda: torch.tensor([0.0, 2.0, 4.0], dtype=x.dtype).view(1, 3, 1, 1).to(x.device),
        )
    )  # (bc - gc, 2 + rc - bc, 4 + gc - rc): the hue in sixths when r, g or b is the maximum
    h6 = torch.where(coloured, sectors.gather(1, first), 0.0)
    h6 = torch.remainder(h6 + 6.0 * shift.view(-1, 1, 1, 1), 6.0)
    n = _cached(
        ("hue_n", str(x.device), x.dtype),
        lambda: torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype).view(1, 3, 1, 1).to(x.device),
    )
    k = torch.remainder(h6 + n, 6.0)
    return torch.addcmul(maxc, delta, torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0), value=-1.0).clamp_(0.0, 1.0)


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
    if isinstance(height, torch.Tensor) or isinstance(width, torch.Tensor):
        hw = torch.stack([torch.as_tensor(v).expand(n) for v in (height, width)], 1)  # (tensors: no host copy)
        hw = hw.to(device=device, dtype=torch.float64)
    else:
        hw = torch.tensor([[float(height), float(width)]], dtype=torch.float64).to(device).expand(n, 2)
    return _boxes(hw, scale, ratio, generator)


def _boxes(hw: torch.Tensor, scale: Sequence[float], ratio: Sequence[float], g: torch.Generator) -> torch.Tensor:
    """:func:`random_resized_boxes` for ``hw`` (n, 2) float64 frame sizes ``(h, w)``: both sides at once (~45 ops).

    torchvision's rule: 10 attempts of an area in ``scale`` and a log-uniform aspect in ``ratio``, the first that
    fits, at a uniform position; else the central fallback, the whole frame or its central part of the nearest
    allowed aspect (h = min(H, round(W / min ratio)), w = min(W, round(H * max ratio)))."""
    n, dev = hw.shape[0], hw.device
    area_u, aspect_u = torch.rand(n, 10, 2, generator=g, device=dev, dtype=torch.float64).unbind(2)
    target = hw.prod(dim=1, keepdim=True) * (area_u * (scale[1] - scale[0]) + scale[0])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(aspect_u * (hi - lo) + lo)
    dims = torch.sqrt(torch.stack([target / aspect, target * aspect], 2)).round_()  # (n, 10, 2): (h, w)
    ok = ((dims > 0) & (dims <= hw.unsqueeze(1))).all(dim=2)
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)  # first valid attempt (0 if none; masked below)
    any_ok = ok.any(dim=1, keepdim=True)
    chosen = dims.gather(1, first.unsqueeze(2).expand(n, 1, 2)).squeeze(1)
    fallback_scale = _cached(
        ("box_fallback", str(dev), min(ratio), max(ratio)),
        lambda: torch.tensor([1.0 / min(ratio), max(ratio)], dtype=torch.float64).to(dev),
    )
    fallback = torch.minimum(hw, (hw.flip(1) * fallback_scale).round_()).clamp_(min=1)
    dims = torch.where(any_ok, chosen, fallback)
    room = hw - dims
    pos = torch.rand(n, 2, generator=g, device=dev, dtype=torch.float64)
    offset = torch.minimum(torch.floor(pos * (room + 1)), room)
    offset = torch.where(any_ok, offset, torch.floor(room / 2))
    return torch.cat([offset, dims], 1).long()


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(n, 2*radius+1) normalised 1-D Gaussian kernels; sigma <= 0 gives the identity kernel."""
    x = _cached(("blur_taps", str(sigma.device), radius), lambda: torch.arange(-radius, radius + 1.0).to(sigma.device))
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


def _jitter_passes(apply: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-row coefficients ``(f, a, b)`` of the six linear passes of :func:`color_jitter`, each ``(3, n, 1, 1, 1)``.

    Brightness, contrast and saturation are all ``f x + (1 - f) other`` with ``other`` 0, the mean gray or the
    gray image: one formula ``f x + a mean + b gray``. Hue sits at one position ``k`` of each row's order: passes
    1-3 run the positions 0, 1, 2 where they come before ``k``, passes 4-6 the positions 1, 2, 3 after it, and
    ``(1, 0, 0)`` (exactly the identity) elsewhere and on rows without jitter."""
    dev, n = order.device, order.shape[0]
    # per op (brightness, contrast, saturation, hue): (f, a, b) = base + factor * slope
    base, slope, identity, position, before = _cached(
        ("jitter_tables", str(dev)),
        lambda: tuple(
            t.to(dev)
            for t in (
                torch.tensor([[0.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]]),
                torch.tensor([[1.0, 0, 0], [1, -1, 0], [1, 0, -1], [0, 0, 0]]),
                torch.tensor([1.0, 0.0, 0.0]),
                torch.tensor([0, 1, 2, 1, 2, 3]),  # the order position each pass runs
                torch.tensor([True, True, True, False, False, False]),  # passes before the hue
            )
        ),
    )
    per_op = torch.addcmul(base, factors.unsqueeze(2), slope)  # (n, 4 ops, 3)
    per_pass = per_op.gather(1, order.index_select(1, position).unsqueeze(2).expand(n, 6, 3))  # (n, 6, 3)
    k = order.argsort(dim=1)[:, 3:]  # each row's hue position (the inverse permutation's entry 3)
    runs = torch.where(before, position < k, position > k) & apply.view(-1, 1)
    per_pass = torch.where(runs.unsqueeze(2), per_pass, identity)
    return per_pass.permute(1, 2, 0).reshape(6, 3, n, 1, 1, 1).unbind(0)


def color_jitter(x: torch.Tensor, apply: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision ColorJitter per sample: the four ops in each sample's own ``order`` where ``apply``.

    ``factors`` (B, 4): brightness, contrast, saturation factors and hue shift; ``order`` (B, 4): a permutation of
    0..3 per sample. Three linear passes, the hue, three linear passes (see :func:`_jitter_passes`), each over the
    whole batch with per-row coefficients: no data-dependent indexing, so no host synchronisation, and about 80 ops
    whatever the batch.
    """
    passes = _jitter_passes(apply, factors, order)
    for i, (f, a, b) in enumerate(passes):
        gray = rgb_to_gray(x)
        x = torch.addcmul(torch.addcmul(x * f, a, gray.mean(dim=(2, 3), keepdim=True)), b, gray).clamp_(0.0, 1.0)
        if i == 2:  # between the passes before and after each row's hue
            x = torch.where(apply.view(-1, 1, 1, 1), adjust_hue(x, factors[:, 3]), x)
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

    def _group(
        self,
        x: torch.Tensor,
        first: int,
        count: int,
        g: torch.Generator,
        sizes: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Crops ``first .. first + count - 1`` of every frame as one tensor of ``count * B`` rows (row ``i * B + b``:
        crop ``first + i`` of frame ``b``), each op once over all rows with per-row parameters. ``sizes``: (B, 2)
        float64 valid sizes, or None (the whole canvas)."""
        b, _, height, width = x.shape
        n, dev, p = count * b, x.device, self.p
        is_global = first < 2
        size = self.global_crops_size if is_global else self.local_crops_size
        scale = self.global_crops_scale if is_global else self.local_crops_scale
        if sizes is None:
            hw = _cached(
                ("frame_hw", str(dev), n, height, width),
                lambda: torch.tensor([[float(height), float(width)]], dtype=torch.float64).to(dev).expand(n, 2),
            )
        else:
            hw = sizes.repeat(count, 1)
        boxes = _boxes(hw, scale, RATIO, g)
        frame = _cached(
            ("frame_of_row", str(dev), b, count),
            lambda: torch.arange(b, dtype=torch.float32).repeat(count).view(-1, 1).to(dev),
        )
        top, left, h, w = boxes.float().split(1, dim=1)
        rois = torch.cat([frame, left, top, left + w, top + h], 1)
        # sampling_ratio=0: ceil(box/out) bilinear points per output pixel, chosen per box inside the kernel.
        out = roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)
        out = out.clamp_(0.0, 1.0)
        # the per-row draws, named after the recipe step that uses each (one (n, 11) draw: same seed, same crops)
        u = torch.rand(n, 11, generator=g, device=dev)
        flip_u, jitter_u, bri_u, con_u, sat_u, hue_u, gray_u, blur_u, sigma_u, solarize_u, _ = u.unbind(1)
        flip = flip_u < p["flip"]
        out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
        jitter = jitter_u < p["jitter"]
        bri, con, sat, hue = p["jitter_strength"]  # dino.crops.color_jitter (recipe: JITTER)
        factors = torch.addcmul(
            _cached(
                ("jitter_low", str(dev), bri, con, sat, hue),
                lambda: torch.tensor([1 - bri, 1 - con, 1 - sat, -hue]).to(dev),
            ),
            u[:, 2:6],
            _cached(
                ("jitter_span", str(dev), bri, con, sat, hue),
                lambda: torch.tensor([2 * bri, 2 * con, 2 * sat, 2 * hue]).to(dev),
            ),
        )
        order = torch.argsort(torch.rand(n, 4, generator=g, device=dev), dim=1)  # random permutation per row
        if p["jitter"] > 0:
            out = color_jitter(out, jitter, factors, order)
        gray = gray_u < p["gray"]
        if p["gray"] > 0:
            out = torch.where(gray.view(-1, 1, 1, 1), rgb_to_gray(out), out)
        blur_p = [p["blur"][min(i, 2)] for i in range(first, first + count)]
        if len(set(blur_p)) == 1:
            blur = blur_u < blur_p[0]
        else:  # the two global crops: their own probabilities
            blur = torch.cat([u_i < p_i for u_i, p_i in zip(blur_u.chunk(count), blur_p, strict=True)])
        lo, hi = p["blur_sigma"]  # dino.crops.blur_sigma (recipe: SIGMA)
        sigma = torch.where(blur, lo + sigma_u * (hi - lo), 0.0)
        if max(blur_p) > 0:
            out = gaussian_blur(out, sigma, radius=math.ceil(3.0 * hi))  # sigma 0 (not drawn): identity kernel
        solarizes = first <= 1 < first + count and p["solarize"] > 0  # global crop 2 only
        if solarizes:
            second = _cached(  # the rows of crop index 1
                ("crop1_rows", str(dev), b, first, count), lambda: (torch.arange(n) // b == 1 - first).to(dev)
            )
            sol = (solarize_u < p["solarize"]) & second
            threshold = p["solarize_threshold"] / 255.0  # dino.crops.solarize_threshold (recipe: 128)
            out = torch.where(sol.view(-1, 1, 1, 1) & (out >= threshold), 1.0 - out, out)
        else:
            sol = torch.zeros_like(blur)
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
        hw = None
        if sizes is not None:
            sizes = sizes.to(device=frames.device, dtype=torch.long)
            x = replicate_edges(x, sizes)
            hw = sizes.double()
        if generator is None:
            generator = torch.Generator(device=frames.device)
            generator.seed()
        crops: list[torch.Tensor] = []
        params: list[dict[str, torch.Tensor]] = []
        for first, count in ((0, 2), (2, self.local_crops_number)):
            if count == 0:
                continue
            out, drawn = self._group(x, first, count, generator, hw)
            crops += out.chunk(count)  # views of one contiguous tensor, crop by crop
            if return_params:
                per_crop = {k: v.chunk(count) for k, v in drawn.items()}
                for i in range(count):
                    params.append({k: v[i] for k, v in per_crop.items()})
                    if sizes is not None:
                        params[-1]["frame_hw"] = sizes
        return (crops, params) if return_params else crops

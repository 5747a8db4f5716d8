"""Multi-crop augmentation of the DINO recipe (2 global + N local crops per frame), two interchangeable backends.

Each crop: random resized crop (bicubic) -> horizontal flip p=0.5 -> colour jitter (0.4, 0.4, 0.2, 0.1) in random
order with p=0.8 -> grayscale p=0.2 -> Gaussian blur sigma~U(0.1, 2) (global 1: always, global 2: p=0.1, locals:
p=0.5) -> solarize at 128 (global 2 only, p=0.2) -> ImageNet normalisation.

Every strength and probability above is a config key under ``dino.crops`` (``flip_p``, ``color_jitter``,
``color_jitter_p``, ``grayscale_p``, ``blur_p``, ``blur_sigma``, ``solarize_p``, ``solarize_threshold``; the
official values are the defaults), read with :func:`recipe_from_crops` and used by all three execution paths (fast
and official CPU backends, and :mod:`surgenet_ssl.data.gpu_augment`).

- ``backend="official"`` (:class:`OfficialMultiCrop`): the PIL/torchvision transforms of the official DINO code,
  kept as the reference and for comparison (about 21 ms per 854x480 frame on one core).
- ``backend="fast"`` (:class:`FastMultiCrop`, the default): the same distribution on uint8 numpy arrays with
  OpenCV kernels, about 7x faster per core. Why it is faster (each measured in ``scripts/bench_augment.py``):
  OpenCV JPEG decoding straight to an RGB array, crop *before* resizing (only the crop's pixels are touched), an
  integer-factor area reduction followed by bicubic (antialiased like PIL's bicubic, at OpenCV-cubic speed),
  colour ops as 256-entry lookup tables / one 3x3 colour matrix / OpenCV HSV with a uint8 hue add, a separable
  Gaussian blur, crops left channel-last (the channel-first copy is made on the training device) and a
  normalisation vectorised over whole pixel rows. Reduced-size JPEG decoding (DCT scaling,
  :mod:`surgenet_ssl.data.decode`) is used only when the frame is so large that the smallest global crop would
  still be downscaled (``decode_min_short``), so output quality is unchanged for the usual 854x480 /
  320-px-storage frames.

Both are subclasses of :class:`MultiCropAugmentation` (the shared signature; not instantiable itself):
:func:`multi_crop_class` maps a ``data.augment_backend`` name to its class, and
:func:`surgenet_ssl.training.datamodule.build_augmentation` builds the worker transform from the config (a multi-crop
backend, or :class:`FrameResize` for ``data.augment_on=gpu``). Every worker transform (:class:`FrameTransform`)
takes a PIL image, an HxWx3 uint8 RGB array, or encoded image bytes (``transform.decode(bytes)`` is what the loader
calls); it counts frames that had to be converted (grayscale/RGBA/CMYK/...) or were smaller than the global crop
(upscaled) in :meth:`~FrameTransform.consume_events`, which the loader adds to its stats.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from surgenet_ssl.data.decode import as_rgb_array, decode_frame, jpeg_info, open_rgb, to_rgb

__all__ = [
    "BLUR_P",
    "MULTI_CROP_BACKENDS",
    "CropDraws",
    "CropGeometry",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FastMultiCrop",
    "FrameResize",
    "FrameTransform",
    "GPU_FRAME_SIZE",
    "MultiCropAugmentation",
    "OfficialMultiCrop",
    "multi_crop_class",
    "random_resized_crop_params",
    "recipe_from_crops",
    "recipe_probabilities",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLUR_P = (1.0, 0.1, 0.5)  # Gaussian blur probability: global crop 1, global crop 2, local crops
SOLARIZE_P = 0.2  # global crop 2 only
JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
JITTER_P, GRAY_P, FLIP_P = 0.8, 0.2, 0.5
SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128  # pixels >= this are inverted (PIL ImageOps.solarize)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
# GPU mode's default canvas (height, width): 16:9 video as prepare stores it at 320 px (round(320 x 16/9) = 569).
GPU_FRAME_SIZE = (320, 569)


def random_resized_crop_params(
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    u: Sequence[float],
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, driven by 22 given uniforms (:attr:`CropDraws.box`):
    ``(top, left, h, w)``.

    ``u[2k], u[2k+1]`` (k < 10) are the area and log-aspect draws of attempt k, ``u[20], u[21]`` the position of
    the first box that fits; if none fits, the centre crop of torchvision's fallback.
    """
    area = height * width
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    top_u, left_u = u[20], u[21]
    for area_u, aspect_u in zip(u[0:20:2], u[1:20:2], strict=True):  # 10 attempts
        target = area * (scale[0] + area_u * (scale[1] - scale[0]))
        aspect = math.exp(lo + aspect_u * (hi - lo))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(top_u * (height - h + 1)), height - h)
            left = min(int(left_u * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, max(1, h), max(1, w)


# -------------------------------------------------------------------------------------------------- base / API
# dino.crops config key -> recipe key (see recipe_probabilities)
AUGMENT_CONFIG_KEYS = {
    "flip_p": "flip",
    "color_jitter": "jitter_strength",
    "color_jitter_p": "jitter",
    "grayscale_p": "gray",
    "blur_p": "blur",
    "blur_sigma": "blur_sigma",
    "solarize_p": "solarize",
    "solarize_threshold": "solarize_threshold",
}


def recipe_probabilities(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The per-op probabilities and strengths of the recipe, with ``overrides`` applied and checked.

    Keys: ``flip``, ``jitter``, ``gray``, ``solarize`` (probabilities; solarization on global crop 2 only),
    ``blur`` (probability per crop position: global 1, global 2, locals), ``jitter_strength`` (brightness, contrast,
    saturation, hue as in torchvision's ColorJitter), ``blur_sigma`` (sigma range in px), ``solarize_threshold``
    (0..256; 256 never inverts).
    """
    p: dict[str, Any] = {
        "flip": FLIP_P,
        "jitter": JITTER_P,
        "gray": GRAY_P,
        "blur": BLUR_P,
        "solarize": SOLARIZE_P,
        "jitter_strength": JITTER,
        "blur_sigma": SIGMA,
        "solarize_threshold": SOLARIZE_THRESHOLD,
    }
    p.update(overrides or {})
    config = {v: k for k, v in AUGMENT_CONFIG_KEYS.items()}

    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"dino.crops.{config.get(key, key)}={p[key]!r}: {why}")

    for key in ("flip", "jitter", "gray", "solarize"):
        if not 0.0 <= float(p[key]) <= 1.0:
            raise bad(key, "a probability must be in [0, 1]")
    p["blur"] = tuple(float(v) for v in p["blur"])
    if len(p["blur"]) != 3 or not all(0.0 <= v <= 1.0 for v in p["blur"]):
        raise bad("blur", "needs 3 probabilities in [0, 1]: global crop 1, global crop 2, local crops")
    p["jitter_strength"] = tuple(float(v) for v in p["jitter_strength"])
    js = p["jitter_strength"]
    if len(js) != 4 or min(js) < 0 or js[0] > 1 or js[1] > 1 or js[2] > 1 or js[3] > 0.5:
        raise bad(
            "jitter_strength",
            "needs [brightness, contrast, saturation, hue] with the first three in [0, 1] and hue in [0, 0.5]",
        )
    p["blur_sigma"] = tuple(float(v) for v in p["blur_sigma"])
    if len(p["blur_sigma"]) != 2 or not 0 < p["blur_sigma"][0] <= p["blur_sigma"][1]:
        raise bad("blur_sigma", "needs [min, max] with 0 < min <= max (px)")
    if not 0 <= int(p["solarize_threshold"]) <= 256:
        raise bad("solarize_threshold", "must be in 0..256 (pixels >= it are inverted; 256: never)")
    p["solarize_threshold"] = int(p["solarize_threshold"])
    return p


def recipe_from_crops(crops: dict[str, Any] | None) -> dict[str, Any]:
    """The augmentation knobs of a ``dino.crops`` config (``flip_p``, ``color_jitter``, ``color_jitter_p``,
    ``grayscale_p``, ``blur_p``, ``blur_sigma``, ``solarize_p``, ``solarize_threshold``) as the overrides that
    :func:`recipe_probabilities` and every backend's ``probabilities=`` take. Absent keys keep the official values."""
    return {AUGMENT_CONFIG_KEYS[k]: v for k, v in (crops or {}).items() if k in AUGMENT_CONFIG_KEYS and v is not None}


class CropGeometry:
    """Crop sizes, scales, count and normalisation shared by the CPU and the GPU execution of the recipe."""

    def _init_geometry(
        self,
        global_crops_size: int,
        local_crops_size: int,
        global_crops_scale: Sequence[float],
        local_crops_scale: Sequence[float],
        local_crops_number: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}")
        for name, s in (("global_crops_scale", global_crops_scale), ("local_crops_scale", local_crops_scale)):
            if len(s) != 2 or not 0 < s[0] <= s[1] <= 1:
                raise ValueError(f"{name} must be (min, max) with 0 < min <= max <= 1, got {tuple(s)}")
        self.global_crops_size, self.local_crops_size = int(global_crops_size), int(local_crops_size)
        self.global_crops_scale, self.local_crops_scale = tuple(global_crops_scale), tuple(local_crops_scale)
        self.local_crops_number = int(local_crops_number)
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def n_crops(self) -> int:
        return 2 + self.local_crops_number


class FrameTransform(ABC):
    """What the loader runs on every frame in its workers: ``decode(bytes)`` (encoded frame -> RGB, see
    :mod:`surgenet_ssl.data.decode`), then ``__call__`` (-> what the batch carries under ``batch_key``), and
    ``consume_events()``. Subclasses: the multi-crop backends (:class:`MultiCropAugmentation`) and, for
    ``data.augment_on=gpu``, :class:`FrameResize`; :func:`surgenet_ssl.training.datamodule.build_augmentation`
    picks one."""

    backend = "base"
    batch_key = "crops"

    def __init__(self) -> None:
        self._events: Counter[str] = Counter()

    @abstractmethod
    def __call__(self, image: Any) -> Any:
        """A PIL image, an HxWx3 uint8 RGB array or encoded image bytes -> the sample's ``batch_key`` entry."""

    def decode(self, data: bytes) -> np.ndarray:
        """Encoded frame -> HxWx3 uint8 RGB (what the loader calls before ``__call__``); counts conversions."""
        arr, converted = decode_frame(data)
        self._count_converted(converted)
        return arr

    def consume_events(self) -> dict[str, int]:
        """Counts since the last call (``converted_images``, ``upscaled_images``); the loader adds them to stats."""
        events, self._events = dict(self._events), Counter()
        return events

    def _count_converted(self, converted: bool) -> None:
        if converted:
            self._events["converted_images"] += 1

    def _as_array(self, image: Any) -> np.ndarray:
        if isinstance(image, (bytes, bytearray, memoryview)):
            return self.decode(bytes(image))
        arr, converted = as_rgb_array(image)
        self._count_converted(converted)
        return arr


class MultiCropAugmentation(FrameTransform, CropGeometry):
    """Frame -> list of normalised crop tensors ``[global_1, global_2, local_1, ..., local_N]`` (each (3,s,s)).

    The common signature of the backends, :class:`FastMultiCrop` ("fast", the default) and
    :class:`OfficialMultiCrop` ("official"); build one by name with ``multi_crop_class(backend)(...)`` (or from the
    config with :func:`surgenet_ssl.training.datamodule.build_augmentation`). Sizes, scales and the number of local
    crops come from the config (``dino.crops``); defaults are the recipe's. ``uint8_output=True`` returns uint8 crops
    (0..255, not normalised): a quarter of the bytes through worker queues, pinned memory and the host-to-device
    copy; the training module normalises them on the device (:func:`surgenet_ssl.data.gpu_augment.normalize_uint8`).
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
        uint8_output: bool = False,
        probabilities: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self._init_geometry(
            global_crops_size, local_crops_size, global_crops_scale, local_crops_scale, local_crops_number, mean, std
        )
        self.uint8_output = bool(uint8_output)
        self.p = recipe_probabilities(probabilities)  # strengths and probabilities (recipe_from_crops(dino.crops))

    def _check_size(self, height: int, width: int) -> None:
        if min(height, width) < self.global_crops_size:
            self._events["upscaled_images"] += 1


# --------------------------------------------------------------------------------------------- official (PIL)
class RandomGaussianBlur:
    """PIL Gaussian blur with probability ``p`` and sigma drawn uniformly from ``(sigma_min, sigma_max)``."""

    def __init__(self, p: float, sigma_min: float = 0.1, sigma_max: float = 2.0) -> None:
        self.p, self.sigma_min, self.sigma_max = p, sigma_min, sigma_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(()) >= self.p:
            return img
        sigma = self.sigma_min + float(torch.rand(())) * (self.sigma_max - self.sigma_min)
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))


class RandomSolarize:
    """Solarize (invert pixels >= threshold) with probability ``p``."""

    def __init__(self, p: float, threshold: int = 128) -> None:
        self.p, self.threshold = p, threshold

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, self.threshold) if torch.rand(()) < self.p else img


class OfficialMultiCrop(MultiCropAugmentation):
    """The official DINO PIL/torchvision pipeline (reference and baseline of the benchmark)."""

    backend = "official"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        p = self.p
        flip_and_jitter = T.Compose(
            [
                T.RandomHorizontalFlip(p=p["flip"]),
                T.RandomApply([T.ColorJitter(*p["jitter_strength"])], p=p["jitter"]),
                T.RandomGrayscale(p=p["gray"]),
            ]
        )
        sigma = p["blur_sigma"]
        as_float = T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])
        normalize = T.PILToTensor() if self.uint8_output else as_float
        bicubic = T.InterpolationMode.BICUBIC

        def crop(size: int, scale: Sequence[float]) -> T.RandomResizedCrop:
            return T.RandomResizedCrop(size, scale=tuple(scale), interpolation=bicubic)

        g, loc = self.global_crops_size, self.local_crops_size
        self.global_1 = T.Compose(
            [
                crop(g, self.global_crops_scale),
                flip_and_jitter,
                RandomGaussianBlur(p["blur"][0], *sigma),
                normalize,
            ]
        )
        self.global_2 = T.Compose(
            [
                crop(g, self.global_crops_scale),
                flip_and_jitter,
                RandomGaussianBlur(p["blur"][1], *sigma),
                RandomSolarize(p["solarize"], p["solarize_threshold"]),
                normalize,
            ]
        )
        self.local = T.Compose(
            [
                crop(loc, self.local_crops_scale),
                flip_and_jitter,
                RandomGaussianBlur(p["blur"][2], *sigma),
                normalize,
            ]
        )

    def decode(self, data: bytes) -> Image.Image:  # type: ignore[override]
        """Encoded frame -> RGB PIL image, decoded by PIL like the official code; counts conversions."""
        img, converted = open_rgb(data)
        self._count_converted(converted)
        return img

    def _as_pil(self, image: Any) -> Image.Image:
        if isinstance(image, (bytes, bytearray, memoryview)):
            return self.decode(bytes(image))
        if isinstance(image, Image.Image):
            image, converted = to_rgb(image)
            self._count_converted(converted)
            return image
        return Image.fromarray(self._as_array(image))

    def __call__(self, image: Any, second: Any = None) -> list[torch.Tensor]:
        """``second``: a neighbouring frame of the same video the second global crop is cut from (temporal
        positives, ``dino.crops.temporal_positive_p``); None: the same frame, as in DINO."""
        image = self._as_pil(image)
        self._check_size(image.height, image.width)
        crops = [self.global_1(image), self.global_2(image if second is None else self._as_pil(second))]
        crops.extend(self.local(image) for _ in range(self.local_crops_number))
        return crops


# ------------------------------------------------------------------------------------------------ fast (OpenCV)
# PIL's blend (ImageEnhance) computes ``v`` in float32 and truncates it, clipped to [0, 255]. OpenCV's vectorised
# scale-and-add kernels round to nearest instead, so they get ``v - 1/2 + 2^-16``: the same integer except where v
# lies within about 2^-16 of an integer, where float32 rounding decides (1 and 2 in 100,000 values over 1,000
# factors for brightness and contrast, off by one level: tests/augment/test_augment_ops.py). One pass each, about
# twice as fast as a lookup table (cv2.LUT is not vectorised).
_TRUNCATE = 2.0**-16 - 0.5


def adjust_brightness(img: np.ndarray, factor: float) -> np.ndarray:
    """PIL ImageEnhance.Brightness: blend with black, ``floor(factor * v)`` (``v * factor >= 0``: the "Abs" of
    ``convertScaleAbs`` never applies)."""
    return cv2.convertScaleAbs(img, alpha=float(np.float32(factor)), beta=_TRUNCATE)


def adjust_contrast(img: np.ndarray, factor: float) -> np.ndarray:
    """PIL ImageEnhance.Contrast: blend with the (rounded) mean of the luma, ``floor(mean + factor (v - mean))``
    (the factor as PIL holds it, in float32)."""
    r, g, b, _ = cv2.mean(img)
    mean = int(0.299 * r + 0.587 * g + 0.114 * b + 0.5)
    f = float(np.float32(factor))
    return cv2.addWeighted(img, f, img, 0.0, mean - f * mean + _TRUNCATE)


_LUMA_ROWS = np.tile(np.array([0.299, 0.587, 0.114], np.float32), (3, 1))  # RGB -> luma, for each output channel
_EYE = np.eye(3, dtype=np.float32)


def adjust_saturation(img: np.ndarray, factor: float) -> np.ndarray:
    """PIL ImageEnhance.Color: blend with the luma image, ``luma + factor (img - luma)``.

    One 3x3 colour matrix (``cv2.transform``) instead of gray, gray-to-RGB and a blend: one pass over the pixels,
    within one grey level of PIL (which rounds the luma first).
    """
    return cv2.transform(img, (1.0 - factor) * _LUMA_ROWS + factor * _EYE)


_HUE_ROWS: dict[tuple[int, int], np.ndarray] = {}


def adjust_hue(img: np.ndarray, factor: float) -> np.ndarray:
    """torchvision adjust_hue on PIL: shift the 8-bit hue (full circle = 256) by ``int(factor * 255)``, wrapping.

    A uint8 add (wrapping modulo 256) of ``(shift, 0, 0)`` repeated along each row of the HSV pixels, not a
    3-channel lookup table: the same pixels; adding over whole contiguous rows is 3x faster than over the strided
    H channel.
    """
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)
    h, w = hsv.shape[:2]
    key = (int(factor * 255) % 256, w)
    row = _HUE_ROWS.get(key)
    if row is None:
        row = _HUE_ROWS[key] = np.tile(np.array([key[0], 0, 0], np.uint8), w)
    pixels = hsv.reshape(h, w * 3)
    pixels += row
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def to_grayscale(img: np.ndarray) -> np.ndarray:
    """Luma replicated to 3 channels (torchvision Grayscale(num_output_channels=3))."""
    return cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """The 1-D kernel ``cv2.GaussianBlur`` builds for uint8 images: size ``round(6 sigma + 1) | 1``, float32."""
    return cv2.getGaussianKernel(round(sigma * 6 + 1) | 1, sigma, cv2.CV_32F)


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with standard deviation ``sigma`` px (edges replicated, like PIL's box-blur passes).

    ``cv2.sepFilter2D`` with GaussianBlur's own kernel: its float path is about twice as fast as GaussianBlur's
    bit-exact fixed-point one on 224-px crops, and within one grey level of it.
    """
    k = gaussian_kernel(sigma)
    return cv2.sepFilter2D(img, -1, k, k, borderType=cv2.BORDER_REPLICATE)


_SOLARIZE_LUTS: dict[int, np.ndarray] = {}


def solarize(img: np.ndarray, threshold: int = SOLARIZE_THRESHOLD) -> np.ndarray:
    """Invert pixels >= ``threshold`` (PIL ImageOps.solarize(img, threshold); 128 in the recipe)."""
    lut = _SOLARIZE_LUTS.get(threshold)
    if lut is None:
        lut = _SOLARIZE_LUTS[threshold] = np.array([v if v < threshold else 255 - v for v in range(256)], np.uint8)
    return cv2.LUT(img, lut)


def resize_crop(img: np.ndarray, top: int, left: int, h: int, w: int, size: int) -> np.ndarray:
    """Crop first, then resize to ``size`` x ``size``: integer-factor area reduction (antialiasing, like PIL's
    bicubic filter support growing with the scale) followed by OpenCV bicubic."""
    region = img[top : top + h, left : left + w]
    k = min(w, h) // size
    if k >= 2:
        region = cv2.resize(region, None, fx=1.0 / k, fy=1.0 / k, interpolation=cv2.INTER_AREA)
    return cv2.resize(region, (size, size), interpolation=cv2.INTER_CUBIC)


_JITTER_FNS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def jitter_factors(d: CropDraws, strength: Sequence[float]) -> tuple[float, float, float, float]:
    """Brightness, contrast, saturation factors and hue shift of a crop (torchvision ColorJitter's ranges)."""
    b, c, s, h = strength
    return (1 - b + 2 * b * d.brightness, 1 - c + 2 * c * d.contrast, 1 - s + 2 * s * d.saturation, -h + 2 * h * d.hue)


def crop_tensor(crop: np.ndarray, normalise: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """HxWx3 uint8 crop -> (3, H, W) tensor in channel-last memory: no channel-first copy in the worker.

    The loader stacks such crops channel-last and the training module makes them contiguous on the device
    (:meth:`surgenet_ssl.training.module.DINOModule.on_after_batch_transfer`): the same values, the copy off the CPU.
    ``normalise``: per-channel ``(scale, shift)`` repeated along a row (length 3 W, from
    :meth:`FastMultiCrop.normalise_rows`) for float output ``x * scale + shift``; None: uint8. Broadcasting a
    whole row keeps the float arithmetic vectorised over contiguous memory (a (3,)-vector over the channel axis
    of HxWx3 memory is about 6x slower), with the same values as normalising a channel-first copy, bit for bit, and
    as normalising uint8 crops on the device (``normalize_uint8``). A fused ``cv2.transform`` of the float32 crop
    is about 1.35x faster here but 1-2 float32 ulps off both, so uint8 and float crops would no longer train the
    same numbers.
    """
    h, w = crop.shape[:2]
    t = torch.from_numpy(crop)
    if normalise is not None:
        scale, shift = normalise
        t = t.reshape(h, w * 3).float().mul_(scale).add_(shift).view(h, w, 3)
    return t.permute(2, 0, 1)


_BOX_UNIFORMS = 22  # random_resized_crop_params: 10 attempts x (area, log-aspect), then (top, left)
_N_UNIFORMS = _BOX_UNIFORMS + 10  # then flip, jitter, 4 jitter factors, gray, blur, sigma, solarize


class CropDraws(NamedTuple):
    """The random draws of one crop of the fast backend, named after the recipe step that uses each.

    Made by :meth:`draw`, which consumes the generator in a fixed order (the same seed gives the same crops): one
    row of 32 uniforms per crop (the fields below up to ``solarize``, in order), then per crop the jitter order.
    Every probability test is ``draw < p``, so ``p=0`` never and ``p=1`` always applies the step.
    """

    box: tuple[float, ...]  # 22 uniforms -> random_resized_crop_params: (top, left, h, w)
    flip: float  # horizontal flip if < p["flip"]
    jitter: float  # colour jitter if < p["jitter"]
    brightness: float  # factor 1 - b + 2 b * draw  (b: jitter_strength[0])
    contrast: float  # factor 1 - c + 2 c * draw
    saturation: float  # factor 1 - s + 2 s * draw
    hue: float  # shift -h + 2 h * draw
    gray: float  # grayscale if < p["gray"]
    blur: float  # Gaussian blur if < p["blur"][crop position]
    sigma: float  # blur sigma lo + (hi - lo) * draw
    solarize: float  # solarize (global crop 2 only) if < p["solarize"]
    jitter_order: list[int]  # permutation of the 4 jitter ops (argsort of 4 uniforms)

    @classmethod
    def draw(cls, rng: np.random.Generator, n: int) -> list[CropDraws]:
        """The draws of ``n`` crops, in the order the generator has always been consumed."""
        uniforms = rng.random((n, _N_UNIFORMS)).tolist()
        orders = np.argsort(rng.random((n, 4)), axis=1).tolist()  # a uniform random permutation per crop
        return [
            cls(*(tuple(u[:_BOX_UNIFORMS]), *u[_BOX_UNIFORMS:], order))  # the fields in order
            for u, order in zip(uniforms, orders, strict=True)
        ]


class FastMultiCrop(MultiCropAugmentation):
    """The DINO multi-crop distribution on uint8 arrays with OpenCV kernels (default backend).

    Extra args: ``decode_min_short`` (reduced-size JPEG decoding keeps the shorter side >= this; ``None`` = the
    size at which the smallest global crop is not upscaled, ``0`` = never reduce); ``seed`` (fixed RNG, for tests;
    default: per process from ``torch.initial_seed()``, which the loader sets per worker); ``probabilities``
    (every backend: override ``flip``, ``jitter``, ``gray``, ``blur`` (3-tuple), ``solarize`` and the strengths,
    see :func:`recipe_probabilities`; training passes ``recipe_from_crops(dino.crops)``).
    Call with ``return_params=True`` to also get, per crop, the drawn parameters (box, flip, jitter factors and
    order or None, gray, blur sigma or None, solarize).
    """

    backend = "fast"

    def __init__(
        self,
        *args: Any,
        decode_min_short: int | None = None,
        seed: int | None = None,
        probabilities: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs["probabilities"] = probabilities  # a keyword of the base class (not positional here)
        super().__init__(*args, **kwargs)
        if decode_min_short is None:
            decode_min_short = math.ceil(self.global_crops_size / math.sqrt(self.global_crops_scale[0]))
        self.decode_min_short = int(decode_min_short)
        self.seed = seed
        self._rng: np.random.Generator | None = None
        self._rng_key: tuple[int, int] | None = None
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        self._scale, self._shift = torch.from_numpy(1.0 / (255.0 * std)), torch.from_numpy(-mean / std)
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_rng"], state["_rng_key"] = None, None  # re-seeded in each worker
        return state

    def normalise_rows(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``1/(255 std)`` and ``-mean/std`` repeated for one row of HxWx3 pixels (see :func:`crop_tensor`)."""
        rows = self._rows.get(width)
        if rows is None:
            rows = self._rows[width] = (self._scale.repeat(width), self._shift.repeat(width))
        return rows

    def rng(self) -> np.random.Generator:
        """Per-process generator: reseeded when the process or torch's seed changes (fork/worker re-seeding)."""
        key = (os.getpid(), torch.initial_seed() if self.seed is None else self.seed)
        if self._rng is None or key != self._rng_key:
            self._rng = np.random.default_rng([key[1] & 0xFFFFFFFFFFFF, 0xD1A0])
            self._rng_key = key
        return self._rng

    def decode(self, data: bytes) -> np.ndarray:
        arr, converted = decode_frame(data, self.decode_min_short)
        self._count_converted(converted)
        return arr

    def _crop(self, img: np.ndarray, index: int, d: CropDraws, params: list | None) -> torch.Tensor:
        is_global = index < 2
        size = self.global_crops_size if is_global else self.local_crops_size
        scale = self.global_crops_scale if is_global else self.local_crops_scale
        top, left, h, w = random_resized_crop_params(img.shape[0], img.shape[1], scale, RATIO, d.box)
        out = resize_crop(img, top, left, h, w, size)
        p = self.p
        flip = d.flip < p["flip"]
        if flip:
            out = cv2.flip(out, 1)
        factors = jitter_factors(d, p["jitter_strength"]) if d.jitter < p["jitter"] else None
        if factors is not None:
            for k in d.jitter_order:
                out = _JITTER_FNS[k](out, factors[k])
        gray = d.gray < p["gray"]
        if gray:
            out = to_grayscale(out)
        blur_p = p["blur"][min(index, 2)]
        lo, hi = p["blur_sigma"]
        sigma = lo + d.sigma * (hi - lo) if d.blur < blur_p else None
        if sigma is not None:
            out = gaussian_blur(out, sigma)
        sol = index == 1 and d.solarize < p["solarize"]
        if sol:
            out = solarize(out, p["solarize_threshold"])
        if params is not None:  # only when asked: a dict per crop costs time on the hot path
            jitter: dict[str, Any] | None = None
            if factors is not None:
                jitter = {
                    **dict(zip(JITTER_OPS, factors, strict=True)),
                    "order": [JITTER_OPS[k] for k in d.jitter_order],
                }
            params.append(
                {
                    "box": (top, left, h, w),
                    "flip": flip,
                    "jitter": jitter,
                    "gray": gray,
                    "sigma": sigma,
                    "solarize": sol,
                    "size": size,
                    "frame": img.shape[:2],
                }
            )
        return crop_tensor(out, None if self.uint8_output else self.normalise_rows(size))

    def __call__(self, image: Any, return_params: bool = False, second: Any = None) -> Any:
        """``second``: a neighbouring frame of the same video the second global crop is cut from (temporal
        positives, ``dino.crops.temporal_positive_p``); None: the same frame, as in DINO. The random draws are the
        same either way (a run with and without it differs in that crop's pixels only)."""
        img = self._as_array(image)
        self._check_size(img.shape[0], img.shape[1])
        other = img if second is None else self._as_array(second)
        draws = CropDraws.draw(self.rng(), self.n_crops)
        params: list | None = [] if return_params else None
        crops = [self._crop(other if i == 1 else img, i, d, params) for i, d in enumerate(draws)]
        return (crops, params) if return_params else crops


MULTI_CROP_BACKENDS: dict[str, type[MultiCropAugmentation]] = {"fast": FastMultiCrop, "official": OfficialMultiCrop}


def multi_crop_class(backend: str) -> type[MultiCropAugmentation]:
    """The multi-crop class of a ``data.augment_backend`` name ("fast" or "official"); anything else is a
    ValueError naming the choices."""
    if backend not in MULTI_CROP_BACKENDS:
        raise ValueError(f"unknown augmentation backend {backend!r}; choose one of {sorted(MULTI_CROP_BACKENDS)}")
    return MULTI_CROP_BACKENDS[backend]


# ------------------------------------------------------------------------------------------ GPU-mode worker side
class FrameResize(FrameTransform):
    """Worker transform of ``data.augment_on=gpu``: decode -> fit into a fixed ``(H, W)`` canvas keeping the aspect
    ratio -> ``(uint8 frame (3, H, W), int32 valid (h, w))``. The loader batches them as ``batch["frames"]`` and
    ``batch["frame_hw"]``; the crops are made on the device, each within its frame's valid region
    (:mod:`surgenet_ssl.data.gpu_augment`).

    Why fit instead of cover-and-centre-crop: cropping every frame to the canvas aspect cut 25% of the rows of 4:3
    frames (30% of 5:4, 44% of square ones) and upscaled them, so the crop distribution was not the recipe's. Now a
    frame is only downscaled, by ``min(H/h, W/w, 1)``: landscape frames up to the canvas aspect keep their shorter
    side at ``H`` (320 px, the storage size); wider ones fit the width; smaller ones stay as they are (like the CPU
    path, which upsamples the crops). The rest of the canvas is zero padding (the device replicates the edge pixel
    where bilinear sampling reaches it). Frames smaller than the canvas both ways are counted as ``upscaled_images``.

    A frame that fits the canvas up to one odd pixel per side is not resized at all: its last row/column is cropped
    (a general area resize costs about three JPEG decodes, and 16:9 video stored at 320 px is 569 px wide, one more
    than 320 x 16/9). The default canvas, 320x569, takes those frames whole; ``data.gpu_frame_size=auto`` derives it
    from the sources' manifests (:func:`surgenet_ssl.training.datamodule.gpu_frame_size`).
    """

    backend = "gpu"
    batch_key = "frames"
    batch_keys = ("frames", "frame_hw")

    def __init__(self, frame_size: Sequence[int] = GPU_FRAME_SIZE, global_crops_size: int = 224) -> None:
        super().__init__()
        if len(frame_size) != 2 or min(frame_size) < 1:
            raise ValueError(f"frame_size must be (height, width) > 0, got {frame_size}")
        self.frame_size = (int(frame_size[0]), int(frame_size[1]))
        self.global_crops_size = int(global_crops_size)  # informative: the crops are made on the device

    def fits(self, h: int, w: int) -> bool:
        """Whether a frame of that size goes into the canvas without a resize (padded, or its odd pixel cropped)."""
        fh, fw = self.frame_size
        return h <= fh + 1 and w <= fw + 1

    def fitted_size(self, h: int, w: int) -> tuple[int, int]:
        """The ``(h, w)`` a frame of that size gets in the canvas: aspect kept, only ever downscaled."""
        fh, fw = self.frame_size
        if self.fits(h, w):
            return min(h, fh), min(w, fw)
        s = min(fh / h, fw / w)
        return min(fh, max(1, round(h * s))), min(fw, max(1, round(w * s)))

    def decode(self, data: bytes) -> np.ndarray:
        info = jpeg_info(data)
        min_short = 0
        if info is not None:  # reduce while decoding as long as the frame keeps at least its fitted size
            min_short = min(self.fitted_size(info[0], info[1]))
        arr, converted = decode_frame(data, min_short)
        self._count_converted(converted)
        return arr

    def __call__(self, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
        img = self._as_array(image)
        h, w = img.shape[:2]
        fh, fw = self.frame_size
        if min(fh / h, fw / w) > 1:  # smaller than the canvas both ways: its crops are upsampled on the device
            self._events["upscaled_images"] += 1
        nh, nw = self.fitted_size(h, w)
        if self.fits(h, w):
            img = img[:nh, :nw]  # at most the odd row/column cut
        else:
            img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
        out = np.zeros((3, fh, fw), dtype=np.uint8)
        out[:, :nh, :nw] = img.transpose(2, 0, 1)
        return torch.from_numpy(out), torch.tensor([nh, nw], dtype=torch.int32)

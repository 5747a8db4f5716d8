"""Joint image + mask augmentation for segmentation, and the classification transforms.

Segmentation (uint8 HxWx3 image, int64 HxW mask; geometry applied to both, photometry to the image only):

- train: resize to ``size x s`` with ``s ~ U(scale)`` (image bilinear, mask nearest: class ids are never mixed),
  random crop of ``size`` (padded with 0 / ``ignore_index`` where the scaled image is smaller, so padding is never
  learned as a class), horizontal / vertical flips, brightness / contrast / saturation jitter;
- eval: the image resized to ``size``; the mask stays at its original resolution (predictions are upsampled to it,
  so metrics are computed on the annotation itself).

``size`` is ``(height, width)``; the FPN needs both divisible by 32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import Tensor
from torchvision import transforms

from surgenet_ssl.evaluation.features import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "SegmentationTransform",
    "normalize_image",
    "classification_transform",
    "as_size",
]

_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32) * 255
_STD = np.array(IMAGENET_STD, dtype=np.float32) * 255


def as_size(value) -> tuple[int, int]:
    """``224`` or ``[h, w]`` -> ``(h, w)``."""
    if isinstance(value, (int, float)):
        return int(value), int(value)
    h, w = (int(v) for v in value)
    return h, w


def normalize_image(image: np.ndarray) -> Tensor:
    """uint8/float HxWx3 RGB -> float32 3xHxW tensor with ImageNet mean/std."""
    x = (image.astype(np.float32) - _MEAN) / _STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def _resize(image: np.ndarray, hw: tuple[int, int], nearest: bool) -> np.ndarray:
    h, w = hw
    if image.shape[:2] == (h, w):
        return image
    if nearest:
        return cv2.resize(image, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)  # pixel-centre aligned
    shrink = h < image.shape[0] and w < image.shape[1]
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation factors in [1 - strength, 1 + strength] (PIL's definitions)."""
    x = image.astype(np.float32)
    b, c, s = rng.uniform(1 - strength, 1 + strength, 3)
    x = x * b
    gray = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = (x - gray.mean()) * c + gray.mean()
    gray = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = gray[..., None] + (x - gray[..., None]) * s
    return x.clip(0, 255).astype(np.uint8)


@dataclass
class SegmentationTransform:
    """Callable ``(image, mask, rng) -> (image tensor, mask tensor)``; see the module docstring."""

    size: tuple[int, int]
    train: bool
    scale: tuple[float, float] = (0.5, 2.0)
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float = 0.2
    ignore_index: int = 255

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None = None):
        if not self.train:
            return normalize_image(_resize(image, self.size, nearest=False)), torch.from_numpy(mask.astype(np.int64))
        rng = rng if rng is not None else np.random.default_rng()
        h, w = self.size
        s = float(rng.uniform(*self.scale))
        sh, sw = max(1, round(h * s)), max(1, round(w * s))
        image = _resize(image, (sh, sw), nearest=False)
        mask = _resize(mask.astype(np.uint8 if mask.max(initial=0) < 256 else np.int32), (sh, sw), nearest=True)
        if sh < h or sw < w:  # pad to at least the crop size: image 0, mask ignore
            ph, pw = max(0, h - sh), max(0, w - sw)
            image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
            mask = np.pad(mask.astype(np.int64), ((0, ph), (0, pw)), constant_values=self.ignore_index)
        y = int(rng.integers(0, image.shape[0] - h + 1))
        x = int(rng.integers(0, image.shape[1] - w + 1))
        image, mask = image[y : y + h, x : x + w], mask[y : y + h, x : x + w]
        if rng.random() < self.hflip:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if rng.random() < self.vflip:
            image, mask = image[::-1], mask[::-1]
        if self.color_jitter > 0:
            image = _jitter(np.ascontiguousarray(image), self.color_jitter, rng)
        mask_t = torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64))
        return normalize_image(np.ascontiguousarray(image)), mask_t


def classification_transform(
    size: Sequence[int] | int,
    train: bool,
    hflip: float = 0.5,
    vflip: float = 0.0,
    color_jitter: float = 0.2,
    scale: Sequence[float] = (0.6, 1.0),
) -> transforms.Compose:
    """PIL image -> normalised tensor of ``size`` (h, w). The whole frame is kept (resized, not center-cropped):
    surgical frames are wide and their borders hold instruments. Train: random resized crop of ``scale`` of the
    area at the target aspect, flips, colour jitter."""
    h, w = as_size(size)
    steps: list = []
    if train:
        steps.append(
            transforms.RandomResizedCrop((h, w), scale=tuple(scale), ratio=(w / h * 0.9, w / h * 1.1), antialias=True)
        )
        if hflip > 0:
            steps.append(transforms.RandomHorizontalFlip(hflip))
        if vflip > 0:
            steps.append(transforms.RandomVerticalFlip(vflip))
        if color_jitter > 0:
            steps.append(transforms.ColorJitter(color_jitter, color_jitter, color_jitter))
    else:
        steps.append(transforms.Resize((h, w), antialias=True))
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)

"""Shared helpers of the augmentation tests: synthetic frames and recipe statistics."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

RATIO = (3 / 4, 4 / 3)


def smooth_image(h: int = 120, w: int = 160, seed: int = 0) -> np.ndarray:
    """A colourful, smooth-ish uint8 RGB frame (gradients + blurred noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / w * 255, y / h * 255, (x + y) / (h + w) * 255], -1)
    noise = rng.normal(0, 25, (h, w, 3))
    k = np.ones(5) / 5
    for axis in (0, 1):
        noise = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), axis, noise)
    return (base + noise).clip(0, 255).astype(np.uint8)


def jpeg_bytes(arr: np.ndarray | Image.Image, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    img = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, quality=95) if fmt == "JPEG" else img.save(buf, fmt)
    return buf.getvalue()


def torchvision_boxes(h: int, w: int, scale: tuple[float, float], n: int, seed: int = 0) -> np.ndarray:
    """Reference (top, left, h, w) draws of torchvision's RandomResizedCrop."""
    torch.manual_seed(seed)
    img = torch.zeros(1, h, w)
    return np.array(
        [RandomResizedCrop.get_params(img, list(scale), list(RATIO)) for _ in range(n)],
        dtype=float,
    )


def box_stats(boxes: np.ndarray, h: int, w: int) -> dict[str, np.ndarray | float]:
    area = boxes[:, 2] * boxes[:, 3] / (h * w)
    log_aspect = np.log(boxes[:, 3] / boxes[:, 2])
    return {"area": area, "log_aspect": log_aspect}


def assert_boxes_match_torchvision(boxes: np.ndarray, h: int, w: int, scale: tuple[float, float]) -> None:
    """Area fraction and aspect ratio of our crops vs torchvision's sampler (quantiles within 0.04 / 0.06)."""
    ours = box_stats(boxes, h, w)
    ref = box_stats(torchvision_boxes(h, w, scale, 3000), h, w)
    # Rounding the box to whole pixels moves the area slightly outside [scale] on small frames.
    tol_area = 3.0 * (h + w) / (h * w)
    assert ours["area"].min() >= scale[0] - tol_area and ours["area"].max() <= scale[1] + tol_area
    assert np.abs(ours["log_aspect"]).max() <= math.log(4 / 3) + 0.1
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(ours["area"], q) - np.quantile(ref["area"], q)) < 0.04, q
        assert abs(np.quantile(ours["log_aspect"], q) - np.quantile(ref["log_aspect"], q)) < 0.06, q
    assert abs(ours["area"].mean() - ref["area"].mean()) < 0.02
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 0] + boxes[:, 2] <= h).all() and (boxes[:, 1] + boxes[:, 3] <= w).all()


def assert_rate(hits: np.ndarray | list, p: float, what: str) -> None:
    """Firing rate within 4.5 binomial standard deviations (exact when p is 0 or 1)."""
    hits = np.asarray(hits, dtype=float)
    n = len(hits)
    rate = hits.mean()
    tol = 4.5 * math.sqrt(p * (1 - p) / n) if 0 < p < 1 else 0.0
    assert abs(rate - p) <= tol, f"{what}: rate {rate:.3f} over {n} crops, expected {p} +- {tol:.3f}"


def assert_uniform(values: np.ndarray, lo: float, hi: float, what: str) -> None:
    """Inside [lo, hi], mean and standard deviation of U(lo, hi) within 6%, and reaching both ends."""
    values = np.asarray(values, dtype=float)
    span = hi - lo
    assert values.min() >= lo - 1e-9 and values.max() <= hi + 1e-9, what
    assert abs(values.mean() - (lo + hi) / 2) < 0.06 * span, what
    assert abs(values.std() - span / math.sqrt(12)) < 0.06 * span, what
    assert values.min() < lo + 0.05 * span and values.max() > hi - 0.05 * span, what

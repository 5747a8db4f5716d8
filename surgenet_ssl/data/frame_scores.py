"""Per-frame quality scores for curation: darkness, information, sharpness, a perceptual hash, out-of-body evidence.

Why these scores (each cheap enough for one streaming pass over millions of frames, ~1 ms per frame):

- **near-black fraction** and **entropy**: black frames, title cards and fades of video uploads are mostly near-black
  or carry a few grey levels. The entropy is taken over the pixels that are *not* near-black, so the dark vignette of
  an endoscope (half of a 16:9 frame) does not lower it, while a title card (a few text colours) stays low.
- **sharpness** (variance of the Laplacian, over the lit interior only, so the vignette's edge does not count):
  blurred, smoke-filled or out-of-focus frames lose their high frequencies.
- **perceptual hash** (DCT hash, 64 bits): near-identical frames of a static stretch differ in a few bits, frames a
  second apart of a moving scene in many (near-duplicates are found per video in :mod:`surgenet_ssl.data.curation`).
- **out-of-body evidence** (``in_body``): an endoscopic frame has a dark circular or letterbox border (the scope's
  vignette) or is filled with tissue hues (reds, pinks, oranges, fat yellow, saturated); the operating room (drapes,
  walls, gowns, lamps, steel) has neither. ``in_body = max(vignette, tissue)``; a frame with little of both is out of
  body. A close-up of skin has tissue hues too: a trained classifier (``out_of_body.classifier``) is the remedy.

Every score is computed on the frame scaled to a shorter side of :data:`ANALYSIS_SHORT` px, so the same frame gives
the same scores whatever size it was prepared at, and thresholds hold across sources. Plain numpy and OpenCV.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

__all__ = [
    "ANALYSIS_SHORT",
    "NEAR_BLACK",
    "SCORES_VERSION",
    "FrameScores",
    "hamming",
    "perceptual_hash",
    "score_frame",
]

SCORES_VERSION = 1  # bump when a score's definition changes: cached scores are recomputed
ANALYSIS_SHORT = 224  # px, shorter side the scores are computed at
NEAR_BLACK = 24  # grey level (0..255) below which a pixel counts as near-black (vignette, black frame)
_BORDER = 0.12  # width of the border bands / corner squares read for the vignette, as a fraction of the side
_INTERIOR_ERODE = 7  # px: the lit interior is shrunk by this much before the Laplacian (the vignette's edge)
_TISSUE_MIN_SATURATION = 70  # OpenCV HSV (0..255): tissue is coloured, walls and steel are not
_TISSUE_MIN_VALUE = 40


@dataclass(frozen=True)
class FrameScores:
    """The scores of one frame (see the module docstring); ``phash`` is a 64-bit integer."""

    dark_fraction: float  # fraction of near-black pixels
    entropy: float  # bits, grey-level histogram of the pixels that are not near-black (0 if none)
    sharpness: float  # variance of the Laplacian over the lit interior (grey levels^2)
    phash: int
    vignette: float  # 0..1: how dark the border (corners or letterbox bands) is
    tissue: float  # 0..1: fraction of lit pixels with tissue hues
    in_body: float  # max(vignette, tissue)

    def as_row(self) -> dict[str, float | str]:
        row: dict[str, float | str] = {k: round(float(v), 4) for k, v in asdict(self).items() if k != "phash"}
        row["phash"] = f"{self.phash:016x}"
        return row


def _analysis_size(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = ANALYSIS_SHORT / min(h, w)
    if scale == 1:
        return rgb
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def perceptual_hash(gray: np.ndarray) -> int:
    """The DCT hash: the 8x8 lowest frequencies of the 32x32 frame, each bit = above their median (DC left out)."""
    small = cv2.resize(gray.astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA)
    low = cv2.dct(small)[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return int(sum(1 << i for i, b in enumerate(bits.tolist()) if b))


def hamming(a: int, b: int) -> int:
    """Bits in which two perceptual hashes differ."""
    return int((a ^ b).bit_count())


def _entropy(values: np.ndarray) -> float:
    if values.size == 0:
        return 0.0
    hist = np.bincount(values, minlength=256).astype(np.float64)
    p = hist[hist > 0] / values.size
    return float(-(p * np.log2(p)).sum())


def _vignette(dark: np.ndarray) -> float:
    """How dark the scope's border is: the darker of the four corners (circular vignette) and of the two pairs of
    opposite bands (letterbox), so a frame with one dark corner (an instrument, a shadow) scores low."""
    h, w = dark.shape
    bh, bw = max(1, int(h * _BORDER)), max(1, int(w * _BORDER))
    corners = [dark[:bh, :bw], dark[:bh, -bw:], dark[-bh:, :bw], dark[-bh:, -bw:]]
    corner = min(float(c.mean()) for c in corners)
    rows = min(float(dark[:bh].mean()), float(dark[-bh:].mean()))
    cols = min(float(dark[:, :bw].mean()), float(dark[:, -bw:].mean()))
    return max(corner, rows, cols)


def _tissue(rgb: np.ndarray, lit: np.ndarray) -> float:
    """Fraction of lit pixels with tissue hues: red to yellow (0..35 degrees x 2 in OpenCV's 0..180) or pink/magenta
    (>= 150), saturated and not dark."""
    if not lit.any():
        return 0.0
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    warm = (hue <= 35) | (hue >= 150)
    tissue = warm & (sat >= _TISSUE_MIN_SATURATION) & (val >= _TISSUE_MIN_VALUE) & lit
    return float(tissue.sum() / lit.sum())


def score_frame(rgb: np.ndarray) -> FrameScores:
    """The scores of one HxWx3 uint8 RGB frame."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or min(rgb.shape[:2]) < 8:
        raise ValueError(f"expected an HxWx3 uint8 RGB frame of at least 8x8 pixels, got {rgb.dtype} {rgb.shape}")
    rgb = _analysis_size(rgb)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    dark = gray < NEAR_BLACK
    lit = ~dark
    interior = cv2.erode(lit.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=_INTERIOR_ERODE).astype(bool)
    laplacian = cv2.Laplacian(gray.astype(np.float32), cv2.CV_32F, ksize=1)
    sharpness = float(laplacian[interior].var()) if interior.sum() >= 64 else 0.0
    vignette = _vignette(dark)
    tissue = _tissue(rgb, lit)
    return FrameScores(
        dark_fraction=float(dark.mean()),
        entropy=_entropy(gray[lit]),
        sharpness=sharpness,
        phash=perceptual_hash(gray),
        vignette=vignette,
        tissue=tissue,
        in_body=max(vignette, tissue),
    )

"""Image decoding for the whole data path: encoded frames or image files -> RGB, in one place.

Used by prepare (image folders -> shards: :func:`load_rgb_image`), by the loader (:func:`decode_rgb_image`, when the
transform does not decode itself) and by the augmentation (:func:`decode_frame` for the fast backend and GPU mode,
:func:`open_rgb` for the official one), so that every path decodes and converts a frame the same way:

- Reduced-size JPEG decoding: :func:`jpeg_info` reads the JPEG frame header (microseconds) and
  :func:`decode_frame` lets libjpeg decode at 1/2, 1/4 or 1/8 of the size (DCT scaling, much cheaper than decoding
  the whole frame and resizing) as long as the shorter side stays >= ``min_short``.
- Mode conversion: every decoder returns 3-channel RGB. Grayscale, palette, CMYK and 16-bit grayscale (0..65535
  mapped to 0..255, not clipped) are converted, images with alpha are composited on black, and the decoders say
  whether a frame was converted: the augmentation counts those frames as ``converted_images`` in the loader's stats.
- Corrupt data raises (a truncated JPEG too: it goes to PIL, which raises, instead of OpenCV, which would return a
  grey-padded frame); the loader counts such frames as ``corrupt_images`` and skips them.
- EXIF orientation is applied once, when prepare reads image files (:func:`load_rgb_image`), so the frames stored
  in shards are upright; decoding them for training ignores it (OpenCV is told to, PIL never applies it), so the
  OpenCV and the PIL paths give the same frame.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "IMAGE_FORMATS",
    "ImageTooLargeError",
    "as_rgb_array",
    "decode_frame",
    "decode_rgb_image",
    "jpeg_info",
    "load_rgb_image",
    "open_rgb",
    "reduction_factor",
    "set_max_pixels",
    "to_rgb",
]

# The formats PIL may open: what prepare reads and writes (JPEG; MPO is a JPEG variant of some cameras). Anything
# else (PSD, EPS through Ghostscript, ...) is refused before a decoder runs on bytes that came from elsewhere.
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP")
# Decoded pixels at most (width x height): a 12000 x 12000 RGBA PNG of 0.56 MB would decode to 576 MB (and PIL's
# conversions copy it): refused from its header, before decoding. The loader sets it from data.max_image_pixels.
_MAX_PIXELS = [64_000_000]


@functools.cache
def _formats() -> tuple[str, ...]:
    """The allowed formats this PIL build has (MPO, WEBP may be missing)."""
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


class ImageTooLargeError(ValueError):
    """An image whose header announces more pixels than allowed (refused before decoding)."""


def set_max_pixels(limit: int | None) -> None:
    """Refuse images over ``limit`` pixels in this process (None or <= 0: no limit)."""
    _MAX_PIXELS[0] = int(limit) if limit and int(limit) > 0 else 0


def _check_pixels(width: int, height: int) -> None:
    limit = _MAX_PIXELS[0]
    if limit and width * height > limit:
        raise ImageTooLargeError(
            f"image of {width} x {height} = {width * height} pixels is over the limit of {limit} "
            "(data.max_image_pixels); skipped before decoding"
        )


# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic): they carry the size.
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_BYTES_LIKE = (bytes, bytearray, memoryview)


def jpeg_info(data: bytes) -> tuple[int, int, int] | None:
    """``(height, width, components)`` from a baseline/progressive JPEG header, or None if not a (parsable) JPEG.

    Reading the frame header costs microseconds and tells whether OpenCV's fast path applies (3 components)
    and how far the frame may be reduced while decoding.
    """
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if marker in _SOF_MARKERS:
            if i + 10 > n:
                return None
            h = (data[i + 5] << 8) | data[i + 6]
            w = (data[i + 7] << 8) | data[i + 8]
            return h, w, data[i + 9]
        i += 2 + length
    return None


def reduction_factor(height: int, width: int, min_short: int) -> int:
    """The largest of 1, 2, 4, 8 that keeps the shorter side of a ``height`` x ``width`` frame >= ``min_short``
    (1 when ``min_short <= 0``: no reduction)."""
    factor = 1
    if min_short > 0:
        while factor < 8 and min(height, width) // (factor * 2) >= min_short:
            factor *= 2
    return factor


def to_rgb(img: Image.Image) -> tuple[Image.Image, bool]:
    """PIL image of any mode -> RGB (16-bit gray scaled, alpha composited on black); True if it was converted."""
    if img.mode == "RGB":
        return img, False
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: map 0..65535 to 0..255 instead of clipping
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.rint(arr / 257.0).clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img)
    return img.convert("RGB"), True


def as_rgb_array(image: Any) -> tuple[np.ndarray, bool]:
    """PIL image or array -> (HxWx3 uint8 RGB array, converted). PIL images of any mode go through
    :func:`to_rgb`; HxW arrays are replicated to 3 channels and HxWx4 ones lose their alpha (both: converted).
    Raises TypeError for anything else (other shapes, dtypes other than uint8)."""
    if isinstance(image, Image.Image):
        rgb, converted = to_rgb(image)
        return np.asarray(rgb), converted
    arr, converted = np.asarray(image), False
    if arr.ndim == 2:
        arr, converted = np.repeat(arr[:, :, None], 3, axis=2), True
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr, converted = np.ascontiguousarray(arr[:, :, :3]), True
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise TypeError(f"expected an HxWx3 uint8 RGB array, PIL image or image bytes; got {arr.dtype}{arr.shape}")
    return arr, converted


def open_rgb(data: bytes | Path | str) -> tuple[Image.Image, bool]:
    """Encoded image (bytes) or image file (path) -> (RGB PIL image, converted), decoded by PIL. Raises on corrupt
    data."""
    img = Image.open(io.BytesIO(data) if isinstance(data, _BYTES_LIKE) else data, formats=_formats())
    _check_pixels(*img.size)  # from the header: nothing decoded yet
    img.load()
    return to_rgb(img)


def decode_rgb_image(data: bytes | Path | str) -> Image.Image:
    """Open an image (bytes or path) as an RGB PIL image: grayscale, palette, RGBA, CMYK, 16-bit all become RGB."""
    return open_rgb(data)[0]


def decode_frame(data: bytes, min_short: int = 0) -> tuple[np.ndarray, bool]:
    """Encoded image -> (HxWx3 uint8 RGB array, converted). Raises on corrupt data (the loader counts and skips).

    ``min_short > 0`` allows JPEG DCT-domain reduction by 2/4/8 as long as the decoded shorter side stays
    >= ``min_short``. ``converted`` is True when the file was not 3-channel colour (grayscale, CMYK, RGBA, ...).
    """
    import cv2  # here: prepare and the loader's fallback use only the PIL decoders, without importing OpenCV

    info = jpeg_info(data)
    # OpenCV fast path for complete 3-channel JPEGs. A truncated file (no end marker) goes to PIL, which raises
    # instead of returning a grey-padded frame, so the loader counts it as corrupt.
    if info is not None and info[2] == 3 and data.rstrip(b"\x00")[-2:] == b"\xff\xd9":
        _check_pixels(info[1], info[0])
        factor = reduction_factor(info[0], info[1], min_short)
        # RGB straight from libjpeg (IMREAD_COLOR_RGB, OpenCV >= 4.11), not BGR then a channel swap: the same
        # pixels, one pass less. The reduced modes are the grayscale flag (no BGR bit) combined with it.
        rgb_flag = getattr(cv2, "IMREAD_COLOR_RGB", None)
        reduced = {1: 0, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4}
        reduced[8] = cv2.IMREAD_REDUCED_GRAYSCALE_8
        colour = cv2.IMREAD_COLOR if rgb_flag is None else rgb_flag
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), reduced[factor] | colour | cv2.IMREAD_IGNORE_ORIENTATION)
        if arr is None:
            raise ValueError("OpenCV could not decode the JPEG data (corrupt or truncated)")
        return (arr if rgb_flag is not None else cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)), False
    rgb, converted = open_rgb(data)
    return np.asarray(rgb), converted


def load_rgb_image(path: str | Path | bytes) -> np.ndarray:
    """Image file (or its bytes) -> HxWx3 uint8 RGB, EXIF orientation applied (prepare). Raises on corrupt files."""
    img = decode_rgb_image(path if isinstance(path, bytes) else Path(path))
    img = ImageOps.exif_transpose(img) or img
    return np.asarray(img.convert("RGB"))

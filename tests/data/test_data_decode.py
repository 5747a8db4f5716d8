"""Frame decoding (surgenet_ssl.data.decode): reduced-size JPEG decoding, image modes -> RGB and whether a frame was
converted, corrupt data raising, EXIF orientation applied only when prepare reads image files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from surgenet_ssl.data import decode as D


def smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth uint8 RGB frame (gradients + a little noise): JPEG-friendly, with distinct channels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / w * 255, y / h * 255, (x + y) / (h + w) * 255], -1)
    return (base + rng.normal(0, 4, (h, w, 3))).clip(0, 255).astype(np.uint8)


def encode(img: np.ndarray | Image.Image, fmt: str = "JPEG", mode: str | None = None, **kw) -> bytes:
    img = img if isinstance(img, Image.Image) else Image.fromarray(img)
    if mode is not None:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16", "LA"])
def test_any_image_mode_becomes_rgb(mode: str) -> None:
    if mode == "I;16":
        img = Image.fromarray(np.full((6, 8), 40000, dtype=np.uint16))
    else:
        img = Image.new("RGB", (8, 6), (200, 100, 50)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
    out = D.decode_rgb_image(buf.getvalue())
    assert out.mode == "RGB" and out.size == (8, 6)
    if mode == "I;16":
        assert np.asarray(out).max() == 156  # 40000 / 65535 * 255: scaled, not clipped to white


def test_jpeg_header_gives_size_and_components() -> None:
    rgb = smooth(60, 80)
    assert D.jpeg_info(encode(rgb)) == (60, 80, 3)
    assert D.jpeg_info(encode(rgb, progressive=True)) == (60, 80, 3)
    assert D.jpeg_info(encode(rgb, mode="L")) == (60, 80, 1)
    assert D.jpeg_info(encode(rgb, mode="CMYK")) == (60, 80, 4)
    assert D.jpeg_info(encode(rgb, "PNG")) is None
    assert D.jpeg_info(b"") is None and D.jpeg_info(b"\xff\xd8\xff") is None


@pytest.mark.parametrize("min_short", [0, 1, 41, 42, 83, 84, 166, 167, 333, 1000])
def test_reduced_jpeg_decoding_keeps_the_requested_short_side(min_short: int) -> None:
    data = encode(smooth(333, 501))  # odd sizes: the reduced decode rounds up (42x63 at 1/8)
    arr, converted = D.decode_frame(data, min_short=min_short)
    factor = D.reduction_factor(333, 501, min_short)
    assert not converted and arr.dtype == np.uint8 and arr.shape[2] == 3
    assert arr.shape[:2] == (-(-333 // factor), -(-501 // factor))
    if factor > 1:
        assert min(arr.shape[:2]) >= min_short  # reduced only as far as the requested short side allows
    if factor < 8 and min_short > 0:
        assert 333 // (2 * factor) < min_short  # ... and as far as it allows
    assert factor == 1 or min_short > 0  # min_short=0: never reduced


def test_reduction_factor() -> None:
    assert D.reduction_factor(480, 854, 0) == 1
    assert D.reduction_factor(480, 854, 355) == 1
    assert D.reduction_factor(720, 1280, 355) == 2
    assert D.reduction_factor(720, 1280, 90) == 8
    assert D.reduction_factor(720, 1280, 1) == 8  # 8 at most
    assert D.reduction_factor(1280, 720, 180) == 4  # the shorter side, whatever the orientation


def test_opencv_and_pil_decoders_give_the_same_frame() -> None:
    data = encode(smooth(48, 64), quality=90)
    fast, converted = D.decode_frame(data)
    pil = np.asarray(D.decode_rgb_image(data))
    assert not converted and fast.shape == pil.shape == (48, 64, 3)
    assert np.abs(fast.astype(int) - pil).mean() < 0.5  # same libjpeg output, up to IDCT rounding


@pytest.mark.parametrize(
    ("name", "fmt", "mode"),
    [
        ("gray jpeg", "JPEG", "L"),
        ("cmyk jpeg", "JPEG", "CMYK"),
        ("rgba png", "PNG", "RGBA"),
        ("palette png", "PNG", "P"),
        ("gray+alpha png", "PNG", "LA"),
        ("1-bit png", "PNG", "1"),
    ],
)
def test_non_rgb_frames_are_converted_and_reported(name: str, fmt: str, mode: str) -> None:
    arr, converted = D.decode_frame(encode(smooth(24, 32), fmt, mode=mode))
    assert converted, name
    assert arr.shape == (24, 32, 3) and arr.dtype == np.uint8, name
    if mode in ("L", "LA", "1"):
        assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all(), name


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP"])
def test_rgb_frames_are_not_reported_as_converted(fmt: str) -> None:
    arr, converted = D.decode_frame(encode(smooth(24, 32), fmt))
    assert not converted and arr.shape == (24, 32, 3)


def test_16bit_gray_is_scaled_and_alpha_composited_on_black() -> None:
    gray16 = Image.fromarray(np.full((4, 6), 65535, dtype=np.uint16))
    arr, converted = D.decode_frame(encode(gray16, "PNG"))
    assert converted and (arr == 255).all()  # 0..65535 -> 0..255
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, :3, 3] = 255  # left half opaque, right half fully transparent
    arr, converted = D.decode_frame(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert converted and (arr[:, :3] == 200).all() and (arr[:, 3:] == 0).all()


def test_as_rgb_array_converts_arrays_and_pil_images() -> None:
    rgb = smooth(5, 7)
    same, converted = D.as_rgb_array(rgb)
    assert same is rgb and not converted
    gray, converted = D.as_rgb_array(rgb[..., 0])
    assert converted and gray.shape == (5, 7, 3) and (gray[..., 2] == rgb[..., 0]).all()
    rgba = np.concatenate([rgb, np.zeros((5, 7, 1), np.uint8)], axis=2)
    dropped, converted = D.as_rgb_array(rgba)
    assert converted and (dropped == rgb).all()  # arrays: alpha dropped (frames from our own decoders are RGB)
    composited, converted = D.as_rgb_array(Image.fromarray(rgba, "RGBA"))
    assert converted and (composited == 0).all()  # PIL images: alpha composited on black
    assert not D.as_rgb_array(Image.fromarray(rgb))[1]
    with pytest.raises(TypeError, match="HxWx3 uint8"):
        D.as_rgb_array(rgb.astype(np.float32))
    with pytest.raises(TypeError, match="HxWx3 uint8"):
        D.as_rgb_array(np.zeros((5, 7, 2), np.uint8))


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", b"\xff\xd8\xff\xe0 not a jpeg", "truncated jpeg", "truncated png"],
)
def test_corrupt_data_raises(data: bytes | str) -> None:
    if data == "truncated jpeg":  # OpenCV would return it grey-padded: it must raise instead
        data = encode(smooth(48, 64))[:300]
    elif data == "truncated png":
        data = encode(smooth(48, 64), "PNG")[:200]
    with pytest.raises(Exception):  # noqa: B017 - PIL and OpenCV raise many types; the loader counts any as corrupt
        D.decode_frame(data)
    with pytest.raises(Exception):  # noqa: B017
        D.decode_rgb_image(data)


def test_exif_orientation_applied_by_prepare_only(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(smooth(30, 40), exif=exif)
    path = tmp_path / "rotated.jpg"
    path.write_bytes(data)
    upright = D.load_rgb_image(path)
    assert upright.shape == (40, 30, 3) and upright.dtype == np.uint8  # prepare stores the upright frame
    # training decodes frames from shards, already upright: both decoders ignore the tag, so they agree
    assert D.decode_frame(data)[0].shape == (30, 40, 3)
    assert D.decode_rgb_image(data).size == (40, 30)
    (tmp_path / "gray.png").write_bytes(encode(smooth(30, 40), "PNG", mode="L"))
    assert D.load_rgb_image(tmp_path / "gray.png").shape == (30, 40, 3)

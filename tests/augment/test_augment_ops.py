"""Pixel-level checks of the fast pipeline's ops against PIL/torchvision (the official pipeline's kernels)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter

from augment.helpers import smooth_image
from surgenet_ssl.data import augment as A
from surgenet_ssl.data import decode as D

IMG = smooth_image(64, 80, seed=3)
PIL_IMG = Image.fromarray(IMG)
OFF = {
    "flip": 0.0,
    "jitter": 0.0,
    "gray": 0.0,
    "blur": (0.0, 0.0, 0.0),
    "solarize": 0.0,
}


def diff(ours: np.ndarray, ref: Image.Image | np.ndarray) -> np.ndarray:
    return np.abs(ours.astype(int) - np.asarray(ref).astype(int))


def test_brightness_and_contrast_equal_pil_but_for_float_rounding_at_integers() -> None:
    """PIL truncates its float32 blend; the vectorised OpenCV kernels round ``v - 1/2 + 2^-16``: the same value
    everywhere but where v lies within float32 rounding of an integer. Every 8-bit value (a ramp in each channel)
    and two smooth images, over 300 jitter factors and the round ones (0.6 * 125 = 75 exactly in decimals, not in
    float32): at most one level apart, on fewer than 1 in 10,000 values (2e-5 and 9e-6 measured over 1,000
    factors)."""
    ramp = np.stack([np.arange(256, dtype=np.uint8)] * 3, -1)[None].repeat(2, 0)
    ramp[1] = np.roll(ramp[1], 77, 0)
    images = [ramp, IMG, smooth_image(50, 60, seed=5)]
    factors = [0.6, 0.8, 0.93, 1.1, 1.2, 1.4, *np.random.default_rng(0).uniform(0.55, 1.45, 300).tolist()]
    for ours, theirs in ((A.adjust_brightness, F.adjust_brightness), (A.adjust_contrast, F.adjust_contrast)):
        off, total = 0, 0
        for f in factors:
            for img in images:
                d = diff(ours(img, f), theirs(Image.fromarray(img), f))
                assert d.max() <= 1, (ours.__name__, f)
                off, total = off + int((d > 0).sum()), total + d.size
        assert off / total < 1e-4, (ours.__name__, off, total)
    # contrast below 0 and above 255 clips (no absolute value, no wrap-around)
    assert (A.adjust_contrast(ramp, 1.45)[0, :20] == 0).all() and (A.adjust_contrast(ramp, 1.45)[0, -20:] == 255).all()
    assert (A.adjust_brightness(ramp, 1.45)[0, -60:] == 255).all() and (
        A.adjust_brightness(ramp, 0.55)[0, 0] == 0
    ).all()


@pytest.mark.parametrize("f", [0.8, 1.2])
def test_saturation_within_one_level_of_pil(f: float) -> None:
    assert diff(A.adjust_saturation(IMG, f), F.adjust_saturation(PIL_IMG, f)).max() <= 1


@pytest.mark.parametrize("h", [-0.1, 0.04, 0.1])
def test_hue_close_to_torchvision_pil(h: float) -> None:
    d = diff(A.adjust_hue(IMG, h), F.adjust_hue(PIL_IMG, h))
    assert d.mean() < 1.0 and d.max() <= 12  # OpenCV and PIL quantise HSV slightly differently
    moved = diff(A.adjust_hue(IMG, h), IMG).mean()
    assert moved > 3  # and it does rotate the hue


def test_grayscale_blur_solarize_against_pil() -> None:
    g = A.to_grayscale(IMG)
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    assert diff(g, F.to_grayscale(PIL_IMG, 3)).max() <= 1
    for sigma in (0.5, 1.0, 2.0):
        d = diff(A.gaussian_blur(IMG, sigma), PIL_IMG.filter(ImageFilter.GaussianBlur(sigma)))
        assert d.mean() < 1.0, sigma
    # impulse response: the blur's standard deviation is sigma
    impulse = np.zeros((41, 41, 3), np.uint8)
    impulse[20, 20] = 255
    out = A.gaussian_blur(impulse, 1.5)[20, :, 0].astype(float)
    x = np.arange(41) - 20
    assert abs(np.sqrt((out * x**2).sum() / out.sum()) - 1.5) < 0.1
    s = A.solarize(IMG)
    assert (s[IMG >= 128] == 255 - IMG[IMG >= 128]).all() and (s[IMG < 128] == IMG[IMG < 128]).all()


@pytest.mark.parametrize("box", [(0, 0, 64, 80), (5, 7, 50, 41), (10, 10, 20, 20)])
def test_crop_resize_close_to_pil_bicubic(box: tuple[int, int, int, int]) -> None:
    top, left, h, w = box
    ours = A.resize_crop(IMG, top, left, h, w, 24)
    ref = PIL_IMG.crop((left, top, left + w, top + h)).resize((24, 24), Image.BICUBIC)
    assert diff(ours, ref).mean() < 3.0


def denorm(t: torch.Tensor) -> np.ndarray:
    mean, std = (
        torch.tensor(A.IMAGENET_MEAN).view(3, 1, 1),
        torch.tensor(A.IMAGENET_STD).view(3, 1, 1),
    )
    return ((t * std + mean) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def full_frame_aug(**p: float) -> A.FastMultiCrop:
    # scale (1, 1) on a square frame: every crop is the whole frame, so crops can be compared pixel by pixel.
    return A.FastMultiCrop(
        32,
        16,
        global_crops_scale=(1.0, 1.0),
        local_crops_scale=(1.0, 1.0),
        local_crops_number=2,
        seed=0,
        probabilities={**OFF, **p},
    )


def test_pipeline_normalises_and_applies_each_op_to_the_pixels() -> None:
    sq = np.ascontiguousarray(IMG[:64, :64])
    plain = full_frame_aug()(sq)
    ref = A.resize_crop(sq, 0, 0, 64, 64, 32)
    assert np.abs(denorm(plain[0]).astype(int) - ref).max() <= 1  # ImageNet normalisation
    const = full_frame_aug()(np.full((40, 40, 3), 128, np.uint8))[0]
    expected = (128 / 255 - torch.tensor(A.IMAGENET_MEAN)) / torch.tensor(A.IMAGENET_STD)
    assert torch.allclose(const, expected.view(3, 1, 1).expand_as(const), atol=1e-5)
    flipped = full_frame_aug(flip=1.0)(sq)
    assert np.abs(denorm(flipped[0]).astype(int) - ref[:, ::-1]).max() <= 1
    gray = full_frame_aug(gray=1.0)(sq)
    for c in gray:
        g = denorm(c)
        assert (np.abs(g[..., 0].astype(int) - g[..., 2]) <= 1).all()
    sol = full_frame_aug(solarize=1.0)(sq)
    assert np.abs(denorm(sol[1]).astype(int) - A.solarize(ref)).max() <= 1  # global crop 2 only
    assert np.abs(denorm(sol[0]).astype(int) - ref).max() <= 1
    blurred = full_frame_aug(blur=(1.0, 1.0, 1.0))(sq)
    assert (
        np.abs(np.diff(denorm(blurred[0]).astype(float), axis=1)).mean()
        < np.abs(np.diff(ref.astype(float), axis=1)).mean()
    )
    bright = A.FastMultiCrop(
        32, 16, global_crops_scale=(1.0, 1.0), local_crops_number=0, seed=0, probabilities={**OFF, "jitter": 1.0}
    )
    crops, params = bright(np.full((40, 40, 3), 100, np.uint8), return_params=True)
    j = params[0]["jitter"]  # a gray frame: only brightness changes its value (contrast keeps the mean, sat/hue none)
    assert abs(float(denorm(crops[0]).mean()) - 100 * j["brightness"]) <= 1.5


def test_reduced_jpeg_decoding_only_for_large_frames() -> None:
    from augment.helpers import jpeg_bytes

    big = jpeg_bytes(smooth_image(720, 1280))
    assert D.jpeg_info(big) == (720, 1280, 3)
    arr, converted = D.decode_frame(big, min_short=300)
    assert arr.shape == (360, 640, 3) and not converted  # halved: still >= 300 px
    assert D.decode_frame(big, min_short=0)[0].shape == (720, 1280, 3)
    aug = A.FastMultiCrop()  # auto: the smallest global crop (0.4 of the frame) must not be upscaled -> 355 px
    assert aug.decode_min_short == 355
    assert aug.decode(big).shape == (360, 640, 3)
    assert aug.decode(jpeg_bytes(smooth_image(480, 854))).shape == (480, 854, 3)

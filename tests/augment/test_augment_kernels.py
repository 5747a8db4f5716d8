"""The fast kernels of issue 30 against the operation they replace or the official (PIL/torchvision) one."""

from __future__ import annotations

import io
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter

from augment.helpers import jpeg_bytes, smooth_image
from surgenet_ssl.data import augment as A
from surgenet_ssl.data import decode as D
from surgenet_ssl.data.gpu_augment import normalize_uint8
from surgenet_ssl.data.loader import stack_crops
from surgenet_ssl.training.module import DINOModule

IMG = smooth_image(96, 128, seed=7)


def level_diff(a: np.ndarray, b: np.ndarray | Image.Image) -> np.ndarray:
    return np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int))


def test_rgb_decode_equals_pil_and_the_bgr_decode_with_a_swap() -> None:
    data = jpeg_bytes(smooth_image(320, 569, seed=1))
    rgb, converted = D.decode_frame(data)
    assert rgb.shape == (320, 569, 3) and not converted
    official = Image.open(io.BytesIO(data)).convert("RGB")  # what OfficialMultiCrop decodes
    assert level_diff(rgb, official).max() <= 1
    buf = np.frombuffer(data, np.uint8)
    for min_short, flag in ((0, cv2.IMREAD_COLOR), (150, cv2.IMREAD_REDUCED_COLOR_2)):
        bgr = cv2.imdecode(buf, flag | cv2.IMREAD_IGNORE_ORIENTATION)
        assert np.array_equal(D.decode_frame(data, min_short)[0], cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)), min_short


def test_hue_add_equals_the_three_channel_lookup_table_and_stays_near_torchvision() -> None:
    for seed in range(8):
        img = smooth_image(48, 64, seed=seed)
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)
        for factor in np.linspace(-0.1, 0.1, 41):  # the recipe's range
            shift = int(factor * 255)
            lut = np.stack([(np.arange(256) + shift) % 256, np.arange(256), np.arange(256)], axis=1)
            expected = cv2.cvtColor(cv2.LUT(hsv, lut.astype(np.uint8).reshape(1, 256, 3)), cv2.COLOR_HSV2RGB_FULL)
            assert np.array_equal(A.adjust_hue(img, factor), expected), (seed, factor)
    d = level_diff(A.adjust_hue(IMG, 0.08), F.adjust_hue(Image.fromarray(IMG), 0.08))
    assert d.mean() < 1.0  # against torchvision on PIL: OpenCV and PIL quantise HSV slightly differently


@pytest.mark.parametrize("sigma", [0.1, 0.37, 0.8, 1.0, 1.5, 2.0])
def test_separable_blur_within_one_level_of_gaussian_blur_and_close_to_pil(sigma: float) -> None:
    reference = cv2.GaussianBlur(IMG, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)
    ours = A.gaussian_blur(IMG, sigma)
    assert ours.shape == IMG.shape and ours.dtype == np.uint8
    assert level_diff(ours, reference).max() <= 1
    assert level_diff(ours, Image.fromarray(IMG).filter(ImageFilter.GaussianBlur(sigma))).mean() < 1.0
    assert len(A.gaussian_kernel(sigma)) == (round(sigma * 6 + 1) | 1)


@pytest.mark.parametrize("factor", [0.8, 0.87, 0.95, 1.0, 1.06, 1.13, 1.2])
def test_saturation_matrix_within_one_level_of_pil(factor: float) -> None:
    img = smooth_image(224, 224, seed=11)
    assert level_diff(A.adjust_saturation(img, factor), F.adjust_saturation(Image.fromarray(img), factor)).max() <= 1


def channel_first_reference(crops: list[torch.Tensor], uint8: bool) -> list[torch.Tensor]:
    """uint8 crops as made before issue 30: a channel-first copy in the worker, then per-channel normalisation."""
    if uint8:
        return [c.contiguous() for c in crops]
    mean, std = np.asarray(A.IMAGENET_MEAN, np.float32), np.asarray(A.IMAGENET_STD, np.float32)
    scale, shift = torch.from_numpy(1.0 / (255.0 * std)).view(3, 1, 1), torch.from_numpy(-mean / std).view(3, 1, 1)
    return [c.contiguous().float().mul_(scale).add_(shift) for c in crops]


@pytest.mark.parametrize("uint8", [False, True])
def test_channel_last_crops_are_batched_so_and_equal_channel_first_ones_on_the_device(uint8: bool) -> None:
    aug = A.FastMultiCrop(32, 16, local_crops_number=3, seed=4, uint8_output=uint8)
    samples = [aug(smooth_image(60, 90, seed=s)) for s in range(3)]
    first = samples[0][0]
    assert first.shape == (3, 32, 32) and first.permute(1, 2, 0).is_contiguous()  # no copy in the worker
    batch = [stack_crops([s[k] for s in samples]) for k in range(5)]
    assert all(b.is_contiguous(memory_format=torch.channels_last) for b in batch)
    raw = A.FastMultiCrop(32, 16, local_crops_number=3, seed=4, uint8_output=True)  # the same draws
    expected = [channel_first_reference(raw(smooth_image(60, 90, seed=s)), uint8) for s in range(3)]
    want = [torch.stack([e[k] for e in expected]) for k in range(5)]
    out = DINOModule.on_after_batch_transfer(SimpleNamespace(performance={}), {"crops": batch}, 0)
    for got, ref in zip(out["crops"], want, strict=True):
        assert got.is_contiguous() and got.dtype == torch.float32
        if uint8:
            ref = normalize_uint8(ref)
        assert torch.equal(got, ref)  # the same numbers, bit for bit


def test_parameter_records_do_not_change_the_crops() -> None:
    plain = A.FastMultiCrop(32, 16, local_crops_number=4, seed=9)(IMG)
    recorded, params = A.FastMultiCrop(32, 16, local_crops_number=4, seed=9)(IMG, return_params=True)
    assert len(params) == 6 and all(torch.equal(a, b) for a, b in zip(plain, recorded, strict=True))
    jittered = [p["jitter"] for p in params if p["jitter"] is not None]
    assert jittered and all(set(j) == {*A.JITTER_OPS, "order"} for j in jittered)

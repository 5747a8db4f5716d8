"""Loader workers ship uint8 crops; normalising them on the device gives today's float crops (both backends)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from augment.helpers import smooth_image
from surgenet_ssl.data.augment import IMAGENET_STD, FastMultiCrop, OfficialMultiCrop
from surgenet_ssl.data.gpu_augment import normalize_uint8
from surgenet_ssl.training.datamodule import build_augmentation
from surgenet_ssl.training.module import DINOModule

CROPS = {"global_size": 32, "local_size": 16, "global_scale": [0.4, 1.0], "local_scale": [0.05, 0.4], "local_number": 3}
TOL = 1.0 / 255.0 / max(IMAGENET_STD)  # one uint8 level, normalised


def test_fast_backend_uint8_then_device_normalisation_equals_float_crops() -> None:
    img = smooth_image(120, 160)
    floats = FastMultiCrop(32, 16, local_crops_number=3, seed=3)(img)
    raw = FastMultiCrop(32, 16, local_crops_number=3, seed=3, uint8_output=True)(img)
    assert all(c.dtype == torch.uint8 for c in raw)
    assert sum(c.nbytes for c in raw) * 4 == sum(c.nbytes for c in floats)
    for f, u in zip(floats, raw, strict=True):
        normalised = normalize_uint8(u[None])[0]
        assert normalised.dtype == torch.float32
        assert (normalised - f).abs().max() < TOL
        torch.testing.assert_close(normalised, f, atol=1e-5, rtol=0)  # in fact the same arithmetic


def test_official_backend_uint8_then_device_normalisation_equals_float_crops() -> None:
    img = Image.fromarray(smooth_image(120, 160))
    torch.manual_seed(0)
    floats = OfficialMultiCrop(32, 16, local_crops_number=3)(img)
    torch.manual_seed(0)
    raw = OfficialMultiCrop(32, 16, local_crops_number=3, uint8_output=True)(img)
    assert all(c.dtype == torch.uint8 and c.shape == f.shape for c, f in zip(raw, floats, strict=True))
    for f, u in zip(floats, raw, strict=True):
        torch.testing.assert_close(normalize_uint8(u[None])[0], f, atol=1e-5, rtol=0)


def test_build_augmentation_ships_uint8_only_when_asked() -> None:
    img = smooth_image(48, 64)
    assert all(c.dtype == torch.float32 for c in build_augmentation(CROPS)(img))
    assert all(c.dtype == torch.uint8 for c in build_augmentation(CROPS, uint8_crops=True)(img))
    official = build_augmentation(CROPS, backend="official", uint8_crops=True)
    assert all(c.dtype == torch.uint8 for c in official(img))


@pytest.mark.parametrize("channels_last", [False, True])
def test_module_hook_normalises_uint8_crops_on_the_device(channels_last: bool) -> None:
    fake = SimpleNamespace(performance={"channels_last": channels_last})
    img = smooth_image(48, 64)
    aug, ref = build_augmentation(CROPS, uint8_crops=True), build_augmentation(CROPS)
    aug.seed = ref.seed = 5
    crops = [torch.stack(c) for c in zip(aug(img), aug(img), strict=True)]
    expected = [torch.stack(c) for c in zip(ref(img), ref(img), strict=True)]
    out = DINOModule.on_after_batch_transfer(fake, {"crops": crops, "key": ["a", "b"]}, 0)
    assert out["key"] == ["a", "b"] and len(out["crops"]) == 5
    for got, want in zip(out["crops"], expected, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert got.is_contiguous(memory_format=torch.channels_last) == channels_last

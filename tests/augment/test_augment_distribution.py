"""The fast CPU pipeline draws the DINO recipe's augmentation distribution (recorded parameters, 2500 crops)."""

from __future__ import annotations

import numpy as np
import pytest

from augment.helpers import (
    assert_boxes_match_torchvision,
    assert_rate,
    assert_uniform,
    smooth_image,
)
from surgenet_ssl.data.augment import (
    FastMultiCrop,
    MultiCropAugmentation,
    OfficialMultiCrop,
    multi_crop_class,
)
from surgenet_ssl.training.datamodule import build_augmentation

H, W, SAMPLES = 120, 160, 250


@pytest.fixture(scope="module")
def params() -> list[list[dict]]:
    aug = FastMultiCrop(global_crops_size=32, local_crops_size=16, local_crops_number=8, seed=0)
    img = smooth_image(H, W)
    out = []
    for _ in range(SAMPLES):
        crops, p = aug(img, return_params=True)
        assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 8
        out.append(p)
    return out


def test_crop_area_and_aspect_match_torchvision(params: list[list[dict]]) -> None:
    glob = np.array([p[i]["box"] for p in params for i in (0, 1)], dtype=float)
    loc = np.array([p[i]["box"] for p in params for i in range(2, 10)], dtype=float)
    assert_boxes_match_torchvision(glob, H, W, (0.4, 1.0))
    assert_boxes_match_torchvision(loc, H, W, (0.05, 0.4))


def test_each_op_fires_at_the_recipe_rate(params: list[list[dict]]) -> None:
    every = [c for p in params for c in p]
    assert_rate([c["flip"] for c in every], 0.5, "flip")
    assert_rate([c["jitter"] is not None for c in every], 0.8, "colour jitter")
    assert_rate([c["gray"] for c in every], 0.2, "grayscale")
    assert_rate([p[0]["sigma"] is not None for p in params], 1.0, "blur global 1")
    assert_rate([p[1]["sigma"] is not None for p in params], 0.1, "blur global 2")
    assert_rate([c["sigma"] is not None for p in params for c in p[2:]], 0.5, "blur locals")
    assert_rate([p[1]["solarize"] for p in params], 0.2, "solarize global 2")
    assert_rate(
        [c["solarize"] for p in params for c in (p[0], *p[2:])],
        0.0,
        "solarize elsewhere",
    )


def test_jitter_strengths_order_and_blur_sigma(params: list[list[dict]]) -> None:
    jit = [c["jitter"] for p in params for c in p if c["jitter"] is not None]
    assert_uniform([j["brightness"] for j in jit], 0.6, 1.4, "brightness")
    assert_uniform([j["contrast"] for j in jit], 0.6, 1.4, "contrast")
    assert_uniform([j["saturation"] for j in jit], 0.8, 1.2, "saturation")
    assert_uniform([j["hue"] for j in jit], -0.1, 0.1, "hue")
    # torchvision ColorJitter applies the four ops in a uniformly random order: each op at each position 1/4.
    ops = ("brightness", "contrast", "saturation", "hue")
    assert all(sorted(j["order"]) == sorted(ops) for j in jit)
    for pos in range(4):
        for op in ops:
            assert_rate([j["order"][pos] == op for j in jit], 0.25, f"{op} at position {pos}")
    sigmas = [c["sigma"] for p in params for c in p if c["sigma"] is not None]
    assert_uniform(sigmas, 0.1, 2.0, "blur sigma")


def test_seeded_runs_repeat_and_differ_between_seeds() -> None:
    img = smooth_image(48, 64)
    a = FastMultiCrop(32, 16, local_crops_number=2, seed=1)
    b = FastMultiCrop(32, 16, local_crops_number=2, seed=1)
    c = FastMultiCrop(32, 16, local_crops_number=2, seed=2)
    ca, cb, cc = a(img), b(img), c(img)
    assert all((x == y).all() for x, y in zip(ca, cb, strict=True))
    assert not all((x == y).all() for x, y in zip(ca, cc, strict=True))


def test_backend_is_chosen_by_name() -> None:
    assert isinstance(multi_crop_class("fast")(32, 16, local_crops_number=3), FastMultiCrop)
    off = multi_crop_class("official")(global_crops_size=32, local_crops_size=16, local_crops_number=3)
    assert isinstance(off, OfficialMultiCrop) and off.n_crops == 5
    with pytest.raises(ValueError, match="unknown augmentation backend 'pil'"):
        multi_crop_class("pil")
    crops = {
        "global_size": 32,
        "local_size": 16,
        "global_scale": [0.4, 1.0],
        "local_scale": [0.05, 0.4],
        "local_number": 3,
    }
    with pytest.raises(ValueError, match=r"unknown augmentation backend 'pil'; choose one of \['fast', 'official'\]"):
        build_augmentation(crops, backend="pil")
    with pytest.raises(ValueError, match="global_crops_scale"):
        FastMultiCrop(global_crops_scale=(0.5, 0.1))
    with pytest.raises(TypeError):  # the common base is no backend of its own
        MultiCropAugmentation(32, 16)

"""The augmentation strengths/probabilities are config keys (dino.crops.*) with the official defaults, checked at
start, and every path uses them: fast and official CPU backends and the GPU augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image, ImageOps

from augment.helpers import smooth_image
from surgenet_ssl.config.dirs import CONFIG_DIR
from surgenet_ssl.data import augment as A
from surgenet_ssl.data.gpu_augment import GpuMultiCrop
from surgenet_ssl.training.datamodule import build_augmentation

OFF = {"flip": 0.0, "jitter": 0.0, "gray": 0.0, "blur": (0.0, 0.0, 0.0), "solarize": 0.0}
FULL = {"global_crops_scale": (1.0, 1.0), "local_crops_scale": (1.0, 1.0), "local_crops_number": 1}
MEAN, STD = torch.tensor(A.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(A.IMAGENET_STD).view(3, 1, 1)


def _crops_cfg(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.dino.crops, resolve=True)


def test_config_defaults_are_the_official_values_and_map_to_the_recipe():
    recipe = A.recipe_probabilities(A.recipe_from_crops(_crops_cfg()))
    assert recipe == A.recipe_probabilities()  # the config spells out exactly the code's official recipe
    assert recipe["jitter_strength"] == (0.4, 0.4, 0.2, 0.1) and recipe["blur"] == (1.0, 0.1, 0.5)
    assert (recipe["flip"], recipe["jitter"], recipe["gray"], recipe["solarize"]) == (0.5, 0.8, 0.2, 0.2)
    assert recipe["blur_sigma"] == (0.1, 2.0) and recipe["solarize_threshold"] == 128
    changed = A.recipe_from_crops(
        _crops_cfg(
            "dino.crops.solarize_threshold=256",
            "dino.crops.color_jitter=[0.1,0,0,0]",
            "dino.crops.grayscale_p=0",
            "dino.crops.blur_sigma=[0.5,1.0]",
        )
    )
    assert changed["solarize_threshold"] == 256 and changed["jitter_strength"] == [0.1, 0, 0, 0]
    assert changed["gray"] == 0 and changed["blur_sigma"] == [0.5, 1.0]


@pytest.mark.parametrize(
    "override, key",
    [
        ("grayscale_p=1.5", "grayscale_p"),
        ("blur_p=[1,0.5]", "blur_p"),
        ("color_jitter=[0.4,0.4,0.2,0.7]", "color_jitter"),
        ("blur_sigma=[2.0,0.1]", "blur_sigma"),
        ("solarize_threshold=300", "solarize_threshold"),
    ],
)
def test_bad_values_fail_at_start_naming_the_key(override, key):
    crops = _crops_cfg(f"dino.crops.{override}")
    for on in ("cpu", "gpu"):
        with pytest.raises(ValueError, match=f"dino.crops.{key}"):
            build_augmentation(crops, augment_on=on)


def test_training_paths_receive_the_knobs():
    crops = _crops_cfg("dino.crops.solarize_threshold=200", "dino.crops.color_jitter_p=0.3")
    for backend in ("fast", "official"):
        aug = build_augmentation(crops, backend=backend)
        assert aug.p["solarize_threshold"] == 200 and aug.p["jitter"] == 0.3
    official = build_augmentation(crops, backend="official")
    solarize = [t for t in official.global_2.transforms if isinstance(t, A.RandomSolarize)][0]
    assert (solarize.threshold, solarize.p) == (200, 0.2)

    from types import SimpleNamespace

    from surgenet_ssl.training.module import DINOModule

    fake = SimpleNamespace(
        dino_cfg={"crops": {**crops, "global_size": 16, "local_size": 8}}, global_rank=0, _rng_to_restore=None
    )
    DINOModule.on_after_batch_transfer(fake, {"frames": torch.zeros(2, 3, 20, 20, dtype=torch.uint8)}, 0)
    assert fake._gpu_augment.p["solarize_threshold"] == 200 and fake._gpu_augment.p["jitter"] == 0.3


def _solarized_pixels(threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reference crop, fast crop 2, GPU crop 2) of a full-frame crop with solarization always on, as uint8/float."""
    sq = np.ascontiguousarray(smooth_image(40, 40, seed=1))
    p = {**OFF, "solarize": 1.0, "solarize_threshold": threshold}
    fast = A.FastMultiCrop(20, 10, seed=0, probabilities=p, **FULL)(sq)[1]
    fast = ((fast * STD + MEAN) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    ref = A.resize_crop(sq, 0, 0, 40, 40, 20)
    frame = torch.from_numpy(sq).permute(2, 0, 1)[None]
    gpu = GpuMultiCrop(20, 10, probabilities=p, **FULL)(frame, torch.Generator().manual_seed(0))[1][0]
    return ref, fast, (gpu * STD + MEAN).permute(1, 2, 0).numpy()


def test_solarize_threshold_on_every_path():
    ref, fast, _ = _solarized_pixels(200)
    assert np.abs(fast.astype(int) - A.solarize(ref, 200)).max() <= 1
    assert np.array_equal(A.solarize(ref, 200), np.asarray(ImageOps.solarize(Image.fromarray(ref), 200)))
    ref, fast, gpu = _solarized_pixels(256)  # 256: never inverts (white-on-black images keep their content)
    assert np.abs(fast.astype(int) - ref).max() <= 1
    plain = GpuMultiCrop(20, 10, probabilities=OFF, **FULL)(
        torch.from_numpy(np.ascontiguousarray(smooth_image(40, 40, seed=1))).permute(2, 0, 1)[None],
        torch.Generator().manual_seed(0),
    )[1][0]
    assert np.allclose(gpu, (plain * STD + MEAN).permute(1, 2, 0).numpy(), atol=1e-5)
    # the official transform with threshold 256 leaves the image as it is
    assert np.array_equal(np.asarray(A.RandomSolarize(1.0, 256)(Image.fromarray(ref))), ref)


def test_jitter_strength_and_blur_sigma_ranges_on_fast_and_gpu():
    p = {
        **OFF,
        "jitter": 1.0,
        "blur": (1.0, 1.0, 1.0),
        "jitter_strength": (0.05, 0.0, 0.0, 0.0),
        "blur_sigma": (0.5, 0.6),
    }
    frame = np.ascontiguousarray(smooth_image(48, 48, seed=2))
    aug = A.FastMultiCrop(16, 8, seed=0, probabilities=p, local_crops_number=4)
    for _ in range(10):
        _, params = aug(frame, return_params=True)
        for c in params:
            assert 0.95 <= c["jitter"]["brightness"] <= 1.05 and c["jitter"]["contrast"] == 1.0
            assert 0.5 <= c["sigma"] <= 0.6
    gpu = GpuMultiCrop(16, 8, probabilities=p, local_crops_number=4)
    frames = torch.from_numpy(frame).permute(2, 0, 1)[None].repeat(8, 1, 1, 1)
    _, params = gpu(frames, torch.Generator().manual_seed(1), return_params=True)
    for c in params:
        f = c["factors"]
        assert ((f[:, 0] >= 0.95) & (f[:, 0] <= 1.05)).all() and (f[:, 1:3] == 1.0).all() and (f[:, 3] == 0).all()
        assert ((c["sigma"] >= 0.5) & (c["sigma"] <= 0.6)).all()
    # the official backend builds its ColorJitter / blur from the same values
    official = A.OfficialMultiCrop(16, 8, probabilities=p, local_crops_number=1)
    jitter = official.global_1.transforms[1].transforms[1].transforms[0]
    assert jitter.brightness == pytest.approx((0.95, 1.05)) and jitter.contrast is None
    blur = official.global_1.transforms[2]
    assert (blur.sigma_min, blur.sigma_max, blur.p) == (0.5, 0.6, 1.0)

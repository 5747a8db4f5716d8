"""GPU-mode augmentation (run here on CPU tensors): recipe distribution, pixel semantics, module hook."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F

from augment.helpers import (
    assert_boxes_match_torchvision,
    assert_rate,
    assert_uniform,
    smooth_image,
)
from surgenet_ssl.data.gpu_augment import (
    GpuMultiCrop,
    adjust_hue,
    gaussian_blur,
    random_resized_boxes,
)

H, W, B = 60, 80, 250


@pytest.fixture(scope="module")
def run() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    torch.set_num_threads(1)
    frames = torch.from_numpy(smooth_image(H, W)).permute(2, 0, 1).unsqueeze(0).repeat(B, 1, 1, 1)
    aug = GpuMultiCrop(global_crops_size=24, local_crops_size=12, local_crops_number=8)
    return aug(frames, generator=torch.Generator().manual_seed(0), return_params=True)


def test_shapes_and_normalisation(run) -> None:
    crops, _ = run
    assert [tuple(c.shape) for c in crops] == [(B, 3, 24, 24)] * 2 + [(B, 3, 12, 12)] * 8
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)
    const = torch.full((2, 3, 20, 20), 128, dtype=torch.uint8)
    off = {
        "flip": 0.0,
        "jitter": 0.0,
        "gray": 0.0,
        "blur": (0.0, 0.0, 0.0),
        "solarize": 0.0,
    }
    out = GpuMultiCrop(8, 4, local_crops_number=1, probabilities=off)(const)
    expected = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(out[0][0, :, 3, 3], expected, atol=1e-4)


def test_crop_distribution_matches_torchvision(run) -> None:
    _, params = run
    glob = torch.cat([params[i]["box"] for i in (0, 1)]).double().numpy()
    loc = torch.cat([params[i]["box"] for i in range(2, 10)]).double().numpy()
    assert_boxes_match_torchvision(glob, H, W, (0.4, 1.0))
    assert_boxes_match_torchvision(loc, H, W, (0.05, 0.4))
    # central fallback when no attempt fits (scale 1 on a wide frame: torchvision keeps the 4:3 centre)
    box = random_resized_boxes(3, 30, 90, (1.0, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0), "cpu")
    assert box.tolist() == [[0, 25, 30, 40]] * 3


def test_firing_rates_strengths_order_sigma(run) -> None:
    _, p = run

    def cat(key, idx=range(10)):
        return torch.cat([p[i][key] for i in idx]).numpy()

    assert_rate(cat("flip"), 0.5, "flip")
    assert_rate(cat("jitter"), 0.8, "jitter")
    assert_rate(cat("gray"), 0.2, "gray")
    assert_rate(cat("blur", [0]), 1.0, "blur g1")
    assert_rate(cat("blur", [1]), 0.1, "blur g2")
    assert_rate(cat("blur", range(2, 10)), 0.5, "blur locals")
    assert_rate(cat("solarize", [1]), 0.2, "solarize g2")
    assert_rate(cat("solarize", [0, *range(2, 10)]), 0.0, "solarize elsewhere")
    factors = torch.cat([p[i]["factors"][p[i]["jitter"]] for i in range(10)]).numpy()
    for k, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        assert_uniform(factors[:, k], lo, hi, f"jitter factor {k}")
    order = torch.cat([p[i]["order"][p[i]["jitter"]] for i in range(10)]).numpy()
    assert (np.sort(order, axis=1) == np.arange(4)).all()
    for pos in range(4):
        for op in range(4):
            assert_rate(order[:, pos] == op, 0.25, f"op {op} at {pos}")
    sigma = torch.cat([p[i]["sigma"][p[i]["blur"]] for i in range(10)]).numpy()
    assert_uniform(sigma, 0.1, 2.0, "sigma")


def test_ops_match_torchvision_tensor_semantics() -> None:
    x = torch.rand(4, 3, 16, 20)
    shifts = torch.tensor([-0.1, -0.02, 0.05, 0.1])
    ours = adjust_hue(x, shifts)
    for i in range(4):
        assert torch.allclose(ours[i], F.adjust_hue(x[i], float(shifts[i])), atol=1e-5)
    sig = torch.tensor([0.0, 0.5, 1.0, 2.0])
    blurred = gaussian_blur(x, sig)
    assert torch.equal(blurred[0], x[0])  # sigma 0: untouched
    for i in (1, 2, 3):
        ref = F.gaussian_blur(x[i], [13, 13], [float(sig[i])] * 2)
        assert torch.allclose(blurred[i, :, 6:-6, 6:-6], ref[:, 6:-6, 6:-6], atol=1e-5)  # interior (borders differ)


def test_pixel_level_flip_gray_solarize() -> None:
    frame = torch.from_numpy(smooth_image(40, 40, seed=1)).permute(2, 0, 1)[None].repeat(2, 1, 1, 1)
    off = {
        "flip": 0.0,
        "jitter": 0.0,
        "gray": 0.0,
        "blur": (0.0, 0.0, 0.0),
        "solarize": 0.0,
    }
    full = {
        "global_crops_scale": (1.0, 1.0),
        "local_crops_scale": (1.0, 1.0),
        "local_crops_number": 1,
    }

    def aug(**p: float) -> list[torch.Tensor]:
        return GpuMultiCrop(20, 10, probabilities={**off, **p}, **full)(frame, torch.Generator().manual_seed(0))

    plain, flipped, gray, sol = aug(), aug(flip=1.0), aug(gray=1.0), aug(solarize=1.0)
    assert torch.allclose(flipped[0], plain[0].flip(-1), atol=1e-5)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    g = gray[0] * std + mean
    assert torch.allclose(g[:, 0], g[:, 1], atol=1e-5) and torch.allclose(g[:, 1], g[:, 2], atol=1e-5)
    x, s = plain[1] * std + mean, sol[1] * std + mean
    assert torch.allclose(s, torch.where(x >= 128 / 255, 1 - x, x), atol=1e-5)
    assert torch.allclose(sol[0], plain[0])


def test_module_hook_turns_frames_into_crops() -> None:
    from types import SimpleNamespace

    from surgenet_ssl.training.module import DINOModule

    crops_cfg = {
        "global_size": 16,
        "local_size": 8,
        "global_scale": [0.4, 1.0],
        "local_scale": [0.05, 0.4],
        "local_number": 3,
    }
    fake = SimpleNamespace(dino_cfg={"crops": crops_cfg}, global_rank=0)
    frames = torch.randint(0, 256, (5, 3, 30, 40), dtype=torch.uint8)
    out = DINOModule.on_after_batch_transfer(fake, {"frames": frames, "key": ["k"] * 5}, 0)
    assert "frames" not in out and out["key"] == ["k"] * 5
    assert [tuple(c.shape) for c in out["crops"]] == [(5, 3, 16, 16)] * 2 + [(5, 3, 8, 8)] * 3
    cpu_batch = {"crops": [torch.zeros(1)]}
    assert DINOModule.on_after_batch_transfer(fake, cpu_batch, 0) is cpu_batch

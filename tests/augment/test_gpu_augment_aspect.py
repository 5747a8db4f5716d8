"""GPU-mode augmentation keeps each frame's aspect ratio, draws per-sample crops within each frame's valid region
with the CPU path's statistics, never synchronises with the host, and takes its randomness from a generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from augment.helpers import assert_boxes_match_torchvision, box_stats, smooth_image
from surgenet_ssl.data.augment import IMAGENET_MEAN, IMAGENET_STD, FastMultiCrop, FrameResize
from surgenet_ssl.data.gpu_augment import GpuMultiCrop

CANVAS = (60, 107)
# source sizes (h, w) -> size in the canvas: 4:3, 5:4 and 1:1 keep the 60-px shorter side, 16:9 fits the canvas
SOURCES = {
    "4:3": ((90, 120), (60, 80)),
    "5:4": ((64, 80), (60, 75)),
    "1:1": ((60, 60), (60, 60)),
    "16:9": ((54, 96), (54, 96)),
}
PER_ASPECT = 250
OFF = {"flip": 0.0, "jitter": 0.0, "gray": 0.0, "blur": (0.0, 0.0, 0.0), "solarize": 0.0}


def _batch() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    resize = FrameResize(frame_size=CANVAS, global_crops_size=24)
    frames, sizes, names = [], [], []
    for i, (name, (src, fitted)) in enumerate(SOURCES.items()):
        frame, hw = resize(smooth_image(*src, seed=i))
        assert tuple(frame.shape) == (3, *CANVAS) and tuple(hw.tolist()) == fitted, name
        frames += [frame] * PER_ASPECT
        sizes += [hw] * PER_ASPECT
        names += [name] * PER_ASPECT
    return torch.stack(frames), torch.stack(sizes), names


@pytest.fixture(scope="module")
def gpu_params() -> tuple[list[dict], np.ndarray]:
    torch.set_num_threads(1)
    frames, sizes, names = _batch()
    aug = GpuMultiCrop(24, 12, local_crops_number=8, probabilities=OFF)
    crops, params = aug(frames, generator=torch.Generator().manual_seed(0), return_params=True, sizes=sizes)
    assert [tuple(c.shape) for c in crops] == [(len(names), 3, 24, 24)] * 2 + [(len(names), 3, 12, 12)] * 8
    return params, np.array(names)


@pytest.mark.parametrize("aspect", list(SOURCES))
def test_crop_area_and_aspect_match_cpu_mode_per_source_aspect(gpu_params, aspect: str) -> None:
    params, names = gpu_params
    (src_h, src_w), (h, w) = SOURCES[aspect]
    sel = torch.from_numpy(names == aspect)
    glob = torch.cat([params[i]["box"][sel] for i in (0, 1)]).double().numpy()
    loc = torch.cat([params[i]["box"][sel] for i in range(2, 10)]).double().numpy()
    # within the frame's own valid region, with torchvision's distribution for that frame size ...
    assert_boxes_match_torchvision(glob, h, w, (0.4, 1.0))
    assert_boxes_match_torchvision(loc, h, w, (0.05, 0.4))
    # ... and the statistics of the CPU path (fast backend on the source frame, no resizing)
    cpu = FastMultiCrop(24, 12, local_crops_number=8, seed=1, probabilities=OFF)
    img = smooth_image(src_h, src_w)
    cpu_params = [cpu(img, return_params=True)[1] for _ in range(PER_ASPECT)]
    for idx, boxes in (((0, 1), glob), (range(2, 10), loc)):
        ref = box_stats(np.array([p[i]["box"] for p in cpu_params for i in idx], dtype=float), src_h, src_w)
        ours = box_stats(boxes, h, w)
        for key in ("area", "log_aspect"):
            for q in (0.1, 0.5, 0.9):
                assert abs(np.quantile(ours[key], q) - np.quantile(ref[key], q)) < 0.06, (aspect, key, q)


def test_padding_is_never_seen_crops_equal_those_of_the_unpadded_frame() -> None:
    img = torch.from_numpy(smooth_image(40, 50, seed=3)).permute(2, 0, 1)[None].repeat(3, 1, 1, 1)
    canvas = torch.zeros(3, 3, 48, 64, dtype=torch.uint8)
    canvas[:, :, :40, :50] = img
    sizes = torch.tensor([[40, 50]] * 3)
    aug = GpuMultiCrop(20, 10, local_crops_number=2, probabilities=OFF)
    padded = aug(canvas, torch.Generator().manual_seed(5), sizes=sizes)
    plain = aug(img, torch.Generator().manual_seed(5))
    for a, b in zip(padded, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_no_host_sync_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    frames, sizes, _ = _batch()
    frames, sizes = frames[::50], sizes[::50]
    aug = GpuMultiCrop(24, 12, local_crops_number=3)
    aug(frames, torch.Generator().manual_seed(0), sizes=sizes)  # warm: per-device constants are created once

    def sync(*args, **kwargs):
        raise AssertionError("host synchronisation in the GPU augmentation")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    for name in ("tensor", "nonzero", "as_tensor"):
        monkeypatch.setattr(torch, name, sync)
    crops = aug(frames, torch.Generator().manual_seed(1), sizes=sizes)
    monkeypatch.undo()
    assert len(crops) == 5 and all(torch.isfinite(c).all() for c in crops)


def test_randomness_comes_from_the_generator_and_can_be_checkpointed() -> None:
    frames, sizes, _ = _batch()
    frames, sizes = frames[::25], sizes[::25]
    aug = GpuMultiCrop(24, 12, local_crops_number=2)
    g = torch.Generator().manual_seed(7)
    aug(frames, g, sizes=sizes)
    state = g.get_state()  # what a checkpoint stores
    nxt = aug(frames, g, sizes=sizes)
    resumed = aug(frames, torch.Generator().set_state(state), sizes=sizes)
    assert all(torch.equal(a, b) for a, b in zip(nxt, resumed, strict=True))
    other = aug(frames, torch.Generator().manual_seed(8), sizes=sizes)
    assert not torch.equal(nxt[0], other[0])
    # per-sample randomness: identical frames in one batch get different crops
    assert not torch.equal(nxt[0][0], nxt[0][1])


def test_jitter_applies_each_samples_own_order_like_torchvision() -> None:
    n = 12
    frame = torch.from_numpy(smooth_image(32, 32, seed=4)).permute(2, 0, 1)[None].repeat(n, 1, 1, 1)
    full = {"global_crops_scale": (1.0, 1.0), "local_crops_scale": (1.0, 1.0), "local_crops_number": 0}
    plain = GpuMultiCrop(16, 8, probabilities=OFF, **full)(frame, torch.Generator().manual_seed(2))
    jit_aug = GpuMultiCrop(16, 8, probabilities={**OFF, "jitter": 1.0}, **full)
    jittered, params = jit_aug(frame, torch.Generator().manual_seed(2), return_params=True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    orders = set()
    for i in range(n):
        x = plain[0][i] * std + mean
        order, factors = params[0]["order"][i].tolist(), params[0]["factors"][i].tolist()
        orders.add(tuple(order))
        for op in order:
            x = ops[op](x, factors[op])
        torch.testing.assert_close(jittered[0][i] * std + mean, x, atol=2e-4, rtol=0)
    assert len(orders) > 1

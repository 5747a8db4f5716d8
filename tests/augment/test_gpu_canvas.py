"""GPU mode's canvas fits what prepare writes: no resize for a frame that fits (up to an odd pixel), and
``data.gpu_frame_size=auto`` takes the size from the frame sizes the manifests record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from augment.helpers import jpeg_bytes, smooth_image
from data.data_media import write_images
from surgenet_ssl.data import augment as A
from surgenet_ssl.data.augment import GPU_FRAME_SIZE, FrameResize
from surgenet_ssl.data.mixture import resolve_mixture
from surgenet_ssl.data.preparation import PrepareSettings, prepare_source
from surgenet_ssl.training.datamodule import gpu_frame_size


@pytest.fixture
def resizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The (h, w) of every frame FrameResize sends through cv2.resize."""
    seen: list[tuple[int, int]] = []
    real = A.cv2.resize

    def resize(img: np.ndarray, *args: object, **kw: object) -> np.ndarray:
        seen.append(img.shape[:2])
        return real(img, *args, **kw)

    monkeypatch.setattr(A.cv2, "resize", resize)
    return seen


def test_a_569x320_frame_takes_no_resize_path(resizes: list[tuple[int, int]]) -> None:
    frame = smooth_image(320, 569, seed=2)
    assert GPU_FRAME_SIZE == (320, 569)
    out, hw = FrameResize()(frame)  # the default canvas
    assert tuple(hw.tolist()) == (320, 569) and torch.equal(out, torch.from_numpy(frame).permute(2, 0, 1))
    out, hw = FrameResize(frame_size=(320, 568))(frame)  # the old canvas: the odd column is cropped
    assert tuple(hw.tolist()) == (320, 568) and torch.equal(out, torch.from_numpy(frame[:, :568]).permute(2, 0, 1))
    out, hw = FrameResize()(jpeg_bytes(frame))  # decoded in the worker, as the loader does it: full size
    assert tuple(hw.tolist()) == (320, 569)
    assert resizes == []
    FrameResize()(smooth_image(320, 427, seed=3))  # 4:3: padded, not resized
    assert resizes == []
    _, hw = FrameResize()(smooth_image(480, 854, seed=4))  # bigger: still scaled down to the canvas
    assert resizes == [(480, 854)] and tuple(hw.tolist()) == (320, 569)


def test_one_odd_pixel_is_cropped_two_are_resized() -> None:
    resize = FrameResize(frame_size=(60, 107))
    assert resize.fits(61, 108) and resize.fitted_size(61, 108) == (60, 107)
    assert resize.fits(40, 50) and resize.fitted_size(40, 50) == (40, 50)  # smaller: padded
    assert not resize.fits(60, 109) and resize.fitted_size(60, 109) == (59, 107)  # aspect kept


def prepared(root: Path, name: str, sizes: dict[str, int]) -> Path:
    """A source prepared from image folders of the given ``"WxH": count`` (resize_short=60)."""
    for i, (size, n) in enumerate(sizes.items()):
        w, h = (int(v) for v in size.split("x"))
        write_images(root / "in" / name / f"v{i}", n, size=(w, h), names="{i}.png")
    out = root / name
    prepare_source(root / "in" / name, out, PrepareSettings(source=name, resize_short=60), workers=0, progress=False)
    return out


def test_prepare_records_frame_sizes_and_auto_canvas_takes_them(tmp_path: Path) -> None:
    wide = prepared(tmp_path, "wide", {"160x90": 3, "120x90": 2})  # 16:9 and 4:3 -> 107x60 and 80x60
    manifest = json.loads((wide / "manifest.json").read_text())
    assert manifest["frame_sizes"] == {"107x60": 3, "80x60": 2}
    both = {"name": "m", "sources": {"wide": None, "sq": None}}
    prepared(tmp_path, "sq", {"90x90": 2})
    mixture = resolve_mixture(both, tmp_path)
    assert gpu_frame_size("auto", mixture) == (60, 107)  # one height: the widest frame, nothing resized
    assert gpu_frame_size([48, 64], mixture) == (48, 64)  # given: used as it is

    prepared(tmp_path, "tall", {"90x160": 2})  # portrait: 60x107 -> another height
    three = {"name": "m", "sources": {"wide": None, "tall": None}}
    assert gpu_frame_size("auto", resolve_mixture(three, tmp_path)) == GPU_FRAME_SIZE

    manifest.pop("frame_sizes")  # prepared before sizes were recorded
    (wide / "manifest.json").write_text(json.dumps(manifest))
    assert gpu_frame_size("auto", resolve_mixture(both, tmp_path)) == GPU_FRAME_SIZE

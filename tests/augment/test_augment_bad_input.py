"""Bad frames through the real loader: grayscale/RGBA/CMYK/16-bit converted, tiny frames upscaled, both counted in
the loader's stats (also from worker processes); corrupt frames skipped and counted; never a crash."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from augment.helpers import jpeg_bytes, smooth_image
from surgenet_ssl.data.augment import FastMultiCrop, FrameResize, multi_crop_class
from surgenet_ssl.data.decode import decode_frame
from surgenet_ssl.data.loader import build_train_loader
from surgenet_ssl.training.datamodule import build_augmentation

CROPS = {"global_size": 32, "local_size": 16, "global_scale": [0.4, 1.0], "local_scale": [0.05, 0.4], "local_number": 2}


def frames() -> dict[str, bytes]:
    rgb = smooth_image(48, 64)
    i16 = Image.fromarray(smooth_image(48, 64)[..., 0].astype(np.uint16) * 257).convert("I;16")
    return {
        "rgb0": jpeg_bytes(rgb),
        "rgb1": jpeg_bytes(smooth_image(48, 64, seed=1)),
        "gray": jpeg_bytes(rgb, "L"),
        "cmyk": jpeg_bytes(rgb, "CMYK"),
        "rgba_png": jpeg_bytes(rgb, "RGBA", fmt="PNG"),
        "gray16_png": jpeg_bytes(i16, "I;16", fmt="PNG"),
        "tiny": jpeg_bytes(smooth_image(9, 7)),  # smaller than every crop
        "one_px": jpeg_bytes(smooth_image(1, 1)),
        "corrupt": b"\xff\xd8\xff\xe0 not a jpeg",
        "truncated": jpeg_bytes(smooth_image(48, 64, seed=2))[:300],
    }


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from surgenet_ssl.data.shards import ShardWriter, write_json_atomic

    root = tmp_path_factory.mktemp("bad") / "bad"
    w = ShardWriter(root, "shards/bad", "bad", 100)
    for name, data in frames().items():
        w.write(f"bad/{name}", {"jpg": data})
    write_json_atomic(
        root / "manifest.json",
        {
            "format": "surgenet-ssl/source-shards",
            "version": 1,
            "source": "bad",
            "complete": True,
            "frames": len(frames()),
            "shards": [s.to_dict() for s in w.close()],
        },
    )
    return root


@pytest.mark.parametrize("backend", ["fast", "official"])
def test_decode_converts_and_counts(backend: str) -> None:
    aug = multi_crop_class(backend)(32, 16, local_crops_number=1)
    for name, data in frames().items():
        if name in ("corrupt", "truncated"):
            with pytest.raises(Exception):  # noqa: B017 - the loader counts any decoding error as corrupt
                aug.decode(data)
            continue
        crops = aug(aug.decode(data))
        assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)], name
        assert all(torch.isfinite(c).all() for c in crops), name
    assert aug.consume_events() == {"converted_images": 4, "upscaled_images": 2}
    assert aug.consume_events() == {}
    gray = decode_frame(frames()["gray"])[0]
    assert (gray[..., 0] == gray[..., 1]).all()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_counts_conversions_upscales_and_corrupt_frames(source: Path, num_workers: int) -> None:
    loader = build_train_loader(
        {"name": "custom", "path": str(source)},
        "/unused",
        build_augmentation(CROPS),
        batch_size=4,
        num_workers=num_workers,
        steps_per_epoch=6,
        shuffle_buffer=0,
    )
    batches = list(loader)
    assert len(batches) == 6 and all(len(b["crops"]) == 4 for b in batches)
    stats = loader.dataset.stats
    delivered = [k.split("/")[-1] for b in batches for k in b["key"]]
    assert "corrupt" not in delivered and "truncated" not in delivered
    expected_converted = sum(delivered.count(n) for n in ("gray", "cmyk", "rgba_png", "gray16_png"))
    assert expected_converted > 0
    assert stats["converted_images"] == expected_converted
    assert stats["upscaled_images"] == sum(delivered.count(n) for n in ("tiny", "one_px"))
    assert stats["corrupt_images"] >= 2


def test_gpu_mode_workers_batch_fixed_size_uint8_frames(source: Path) -> None:
    transform = build_augmentation(CROPS, augment_on="gpu", frame_size=(24, 40))
    assert isinstance(transform, FrameResize)
    loader = build_train_loader(
        {"name": "custom", "path": str(source)},
        "/unused",
        transform,
        batch_size=4,
        num_workers=0,
        steps_per_epoch=4,
        shuffle_buffer=0,
    )
    batches = list(loader)
    assert all(b["frames"].shape == (4, 3, 24, 40) and b["frames"].dtype == torch.uint8 for b in batches)
    assert "crops" not in batches[0]
    delivered = [k.split("/")[-1] for b in batches for k in b["key"]]
    assert loader.dataset.stats["upscaled_images"] == sum(delivered.count(n) for n in ("tiny", "one_px"))
    # fit, aspect kept: a 48x64 frame scaled by 24/48 -> 24x32 in the top-left of the 24x40 canvas, zero padding
    assert batches[0]["frame_hw"].shape == (4, 2) and (batches[0]["frame_hw"] <= torch.tensor([24, 40])).all()
    frame, hw = transform(smooth_image(48, 64))
    assert frame.shape == (3, 24, 40) and hw.tolist() == [24, 32] and (frame[:, :, 32:] == 0).all()


def test_build_augmentation_choices() -> None:
    assert isinstance(build_augmentation(CROPS), FastMultiCrop)
    assert build_augmentation(CROPS, backend="official").backend == "official"
    with pytest.raises(ValueError, match="augment_on must be 'cpu' or 'gpu'"):
        build_augmentation(CROPS, augment_on="tpu")

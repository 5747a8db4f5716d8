"""``data.decode=gpu``: workers ship JPEG bytes, the device decodes and fits them into GPU mode's canvas. On CPU the
same code runs (torchvision's decode_jpeg accepts CPU tensors), so these tests cover it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from augment.helpers import jpeg_bytes, smooth_image
from surgenet_ssl.data.gpu_decode import JpegBytes, decode_to_canvas
from surgenet_ssl.data.loader import build_train_loader
from surgenet_ssl.training.datamodule import build_augmentation

CROPS = {
    "global_size": 224,
    "local_size": 96,
    "global_scale": [0.4, 1.0],
    "local_scale": [0.05, 0.4],
    "local_number": 2,
}
SIZES = [(320, 569), (400, 400), (300, 500), (320, 570)]  # fits, resized, padded, odd pixel cropped


def _source(root: Path, corrupt: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    from surgenet_ssl.data.shards import MANIFEST_FORMAT, MANIFEST_VERSION, ShardWriter, write_json_atomic

    out, shards, n = root / "src", [], 0
    for v in range(2):
        w = ShardWriter(out, f"shards/v{v:02d}", f"v{v:02d}", 1000)
        for k in range(8):
            key = f"v{v:02d}/{k:08d}"
            h, wd = SIZES[(v * 8 + k) % len(SIZES)]
            jpg = b"\xff\xd8broken" if key in corrupt else jpeg_bytes(smooth_image(h, wd, seed=v * 8 + k))
            w.write(key, {"jpg": jpg, "json": json.dumps({"frame_index": k}).encode()})
            n += 1
        shards += [s.to_dict() for s in w.close()]
    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "source": "src", "procedure": "test",
        "complete": True, "frames": n, "videos": 2, "inputs": 2, "pending": 0, "settings": {},
        "skipped": {"inputs": [], "corrupt_images": 0}, "shards": shards,
    }  # fmt: skip
    write_json_atomic(out / "manifest.json", manifest)


def _batches(root: Path, decode: str) -> list[dict]:
    transform = build_augmentation(CROPS, augment_on="gpu", frame_size=(320, 569), decode=decode)
    loader = build_train_loader(
        {"sources": {"src": None}}, root, transform, batch_size=4, num_workers=0, steps_per_epoch=3, seed=5
    )
    return list(loader)


def test_gpu_decode_gives_the_cpu_path_frames_keys_and_positions(tmp_path: Path) -> None:
    _source(tmp_path)
    cpu, gpu = _batches(tmp_path, "cpu"), _batches(tmp_path, "gpu")
    assert len(cpu) == len(gpu) == 3
    for a, b in zip(cpu, gpu, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["source"], b["source"])
        assert torch.equal(a["position"], b["position"])  # exact resume: the same positions
        assert set(b) >= {"jpeg", "canvas_hw"} and "frames" not in b
        assert all(t.dtype == torch.uint8 and t.dim() == 1 for t in b["jpeg"])
        frames, hw = decode_to_canvas(b["jpeg"], b["canvas_hw"].tolist(), "cpu")
        assert frames.shape == a["frames"].shape and frames.dtype == torch.uint8
        assert torch.equal(hw, a["frame_hw"].to(hw.dtype))
        diff = (frames.int() - a["frames"].int()).abs().float()
        assert diff.mean() < 1.0 and diff.max() <= 12  # JPEG decoders and area resizes differ by a few levels


def test_corrupt_jpegs_are_counted_and_replaced_as_on_the_cpu_path(tmp_path: Path) -> None:
    _source(tmp_path, corrupt={"v00/00000002", "v01/00000005"})
    runs = {}
    for decode in ("cpu", "gpu"):
        transform = build_augmentation(CROPS, augment_on="gpu", frame_size=(320, 569), decode=decode)
        loader = build_train_loader(
            {"sources": {"src": None}}, tmp_path, transform, batch_size=4, num_workers=0, steps_per_epoch=4
        )
        runs[decode] = ([b["key"] for b in loader], loader.dataset.stats["corrupt_images"])
    assert runs["gpu"] == runs["cpu"] and runs["gpu"][1] >= 1
    assert all(len(k) == 4 for k in runs["gpu"][0])


def test_a_frame_only_the_decoder_rejects_is_replaced_in_the_batch_and_counted() -> None:
    good = [jpeg_bytes(smooth_image(320, 569, seed=s)) for s in range(3)]
    broken = good[1][:200] + bytes(range(256)) * 8 + b"\xff\xd9"  # a valid header and end, garbage inside
    t = JpegBytes((320, 569))
    jpeg = [t(t.decode(d)) for d in (good[0], broken, good[2])]
    counted: list[tuple[str, int]] = []
    keys = ["a", "b", "c"]
    frames, _ = decode_to_canvas(jpeg, (320, 569), "cpu", keys=keys, count=lambda n, k: counted.append((n, k)))
    assert frames.shape[0] == 3  # fixed batch size
    assert counted == [("corrupt_images", 1)] and torch.equal(frames[1], frames[2]) and "replaced" in keys[1]


def test_the_worker_check_refuses_what_is_not_a_whole_jpeg() -> None:
    t = JpegBytes((320, 569), max_image_pixels=1000)
    good = jpeg_bytes(smooth_image(20, 30, seed=1))
    assert t.decode(good).nbytes == len(good)
    for bad in (b"\xff\xd8broken", good[: len(good) // 2], b"\x89PNG\r\n"):
        with pytest.raises(ValueError):
            t.decode(bad)
    with pytest.raises(ValueError, match="max_image_pixels"):
        t.decode(jpeg_bytes(smooth_image(40, 40, seed=1)))


def test_decode_gpu_needs_augment_on_gpu() -> None:
    with pytest.raises(ValueError, match="needs data.augment_on=gpu"):
        build_augmentation(CROPS, augment_on="cpu", decode="gpu")
    with pytest.raises(ValueError, match="data.decode must be"):
        build_augmentation(CROPS, augment_on="gpu", decode="nvjpeg")

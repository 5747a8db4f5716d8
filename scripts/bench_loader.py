"""Throughput of the whole training loader (shards -> shuffled JPEG bytes -> decode -> crops -> batches).

Uses the demo dataset (generated on first use under --cache) unless --data-root/--dataset-path is given.
Each worker runs with one torch/OpenCV thread. In CPU-augmentation mode it runs the loader twice, with workers
shipping float32 crops (normalised in the workers, the old path) and uint8 crops (``data.uint8_crops``, normalised
on the device), and prints bytes per sample and samples/s of both. The LAST line is
``bytes_per_sample_uint8=... bytes_per_sample_float32=... samples_per_s_uint8=... samples_per_s_float32=...``
(GPU-augmentation mode: ``frames_per_s=<float>``).

    python scripts/bench_loader.py --workers 2 --backend fast
    python scripts/bench_loader.py --workers 2 --backend official
    python scripts/bench_loader.py --workers 2 --augment-on gpu        # workers only decode + resize
    python scripts/bench_loader.py --dataset-path /data/prepared/cholec80 --workers 8
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgenet_ssl.data.loader import build_train_loader
from surgenet_ssl.datamodule import build_augmentation


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=20, help="batches timed (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--backend", default="fast", choices=["fast", "official"])
    ap.add_argument("--augment-on", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--frame-size", default="320x568", help="HxW of GPU-mode frames")
    ap.add_argument("--local-number", type=int, default=8)
    ap.add_argument(
        "--dataset-path",
        help="a prepared source or folder of sources (default: the demo dataset)",
    )
    ap.add_argument(
        "--cache",
        default=os.path.expanduser("~/.cache/surgenet_ssl"),
        help="demo dataset cache",
    )
    args = ap.parse_args()

    if args.dataset_path:
        dataset = {"name": "custom", "path": args.dataset_path}
    else:
        dataset = {"name": "demo", "generate": "demo", "root": args.cache}
    crops = {
        "global_size": 224,
        "local_size": 96,
        "global_scale": [0.4, 1.0],
        "local_scale": [0.05, 0.4],
        "local_number": args.local_number,
    }
    frame_size = tuple(int(v) for v in args.frame_size.lower().split("x"))
    if args.augment_on == "gpu":
        transform = build_augmentation(crops, augment_on="gpu", frame_size=frame_size)
        frames, elapsed, nbytes = run(args, dataset, transform)
        print(f"bytes_per_sample={nbytes / frames:.0f}")
        print(f"frames_per_s_per_worker={frames / elapsed / max(1, args.workers):.1f}")
        print(f"frames_per_s={frames / elapsed:.1f}")
        return
    result = {}
    for dtype, uint8 in (("float32", False), ("uint8", True)):
        transform = build_augmentation(crops, backend=args.backend, uint8_crops=uint8)
        frames, elapsed, nbytes = run(args, dataset, transform)
        result[dtype] = (nbytes / frames, frames / elapsed)
        print(f"{dtype} crops: {nbytes / frames / 1e6:.3f} MB/sample, {frames / elapsed:.1f} samples/s")
    (b8, s8), (b32, s32) = result["uint8"], result["float32"]
    print(f"uint8 crops: {b32 / b8:.1f}x fewer bytes per sample, {s8 / s32:.2f}x the samples/s of float32 crops")
    print(
        f"bytes_per_sample_uint8={b8:.0f} bytes_per_sample_float32={b32:.0f} samples_per_s_uint8={s8:.1f} "
        f"samples_per_s_float32={s32:.1f}"
    )


def run(args: argparse.Namespace, dataset: dict, transform) -> tuple[int, float, int]:
    """Time ``args.batches`` batches after ``args.warmup``: (frames, seconds, bytes of the batch tensors)."""
    total = args.batches + args.warmup
    loader = build_train_loader(
        dataset,
        args.cache,
        transform,
        batch_size=args.batch_size,
        num_workers=args.workers,
        steps_per_epoch=total,
        shuffle_buffer=256,
    )
    if args.workers > 0:
        loader.worker_init_fn = _one_thread
    else:
        _one_thread(0)
    print(loader.dataset.describe())
    it = iter(loader)
    for _ in range(args.warmup):  # worker start-up, shard opening, shuffle-buffer filling
        next(it)
    start, frames, nbytes = time.perf_counter(), 0, 0
    for batch in it:
        frames += len(batch["key"])
        nbytes += sum(t.nbytes for key in ("crops", "frames", "frame_hw") for t in _tensors(batch.get(key)))
    elapsed = time.perf_counter() - start
    print(
        f"{args.augment_on}/{args.backend}: {frames} frames in {elapsed:.2f} s with {args.workers} workers; "
        f"stats {loader.dataset.stats}"
    )
    return frames, elapsed, nbytes


def _tensors(value) -> list[torch.Tensor]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


if __name__ == "__main__":
    main()

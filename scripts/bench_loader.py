"""Throughput of the whole training loader (shards -> shuffled JPEG bytes -> decode -> crops -> batches).

Uses the demo dataset (generated on first use under --cache) unless --data-root/--dataset-path is given.
Each worker runs with one torch/OpenCV thread. In CPU-augmentation mode it runs the loader twice, with workers
shipping float32 crops (normalised in the workers, the old path) and uint8 crops (``data.uint8_crops``, normalised
on the device), and prints bytes per sample and samples/s of both. The LAST line is
``bytes_per_sample_uint8=... bytes_per_sample_float32=... samples_per_s_uint8=... samples_per_s_float32=...``
(GPU-augmentation mode: ``frames_per_s=<float>``).

``--compare-sampling`` times ``data.sampling=epoch`` against ``resampled`` on the same shards in one run (uint8
crops), with the batch diversity of each (distinct videos per batch); the LAST line is
``frames_per_s_epoch=... frames_per_s_resampled=... ratio_epoch_over_resampled=...``.

    python scripts/bench_loader.py --workers 2 --backend fast
    python scripts/bench_loader.py --workers 2 --backend official
    python scripts/bench_loader.py --workers 2 --augment-on gpu        # workers only decode + resize
    python scripts/bench_loader.py --dataset-path /data/prepared/cholec80 --workers 8
    python scripts/bench_loader.py --workers 2 --compare-sampling
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
from surgenet_ssl.training.datamodule import build_augmentation


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
    ap.add_argument("--frame-size", default="320x569", help="HxW of GPU-mode frames")
    ap.add_argument("--local-number", type=int, default=8)
    ap.add_argument("--compare-sampling", action="store_true", help="epoch vs resampled frames/s, one run")
    ap.add_argument("--sampling", default="epoch", choices=["epoch", "resampled"])
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
    if args.compare_sampling:
        transform = build_augmentation(crops, backend=args.backend, uint8_crops=True)
        rates, diversity = {}, {}
        for sampling in ("resampled", "epoch", "resampled", "epoch"):  # interleaved: load changes hit both
            args.sampling = sampling
            frames, elapsed, _ = run(args, dataset, transform)
            rates.setdefault(sampling, []).append(frames / elapsed)
            diversity[sampling] = _distinct_videos(args, dataset, transform)
        print(_order_targets())
        best = {k: max(v) for k, v in rates.items()}
        for k in ("epoch", "resampled"):
            print(f"{k}: {best[k]:.1f} frames/s (best of {len(rates[k])}), {diversity[k]:.1f} distinct videos/batch")
        print(
            f"frames_per_s_epoch={best['epoch']:.1f} frames_per_s_resampled={best['resampled']:.1f} "
            f"ratio_epoch_over_resampled={best['epoch'] / best['resampled']:.2f}"
        )
        return
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
        sampling=args.sampling,
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
        f"{args.sampling} {args.augment_on}/{args.backend}: {frames} frames in {elapsed:.2f} s with {args.workers} "
        "workers; "
        f"stats {loader.dataset.stats}"
    )
    return frames, elapsed, nbytes


def _order_targets() -> str:
    """Issue 28's shuffle targets, measured on the epoch order itself (no data needed): distinct videos per batch
    of 64 from 100 videos x 200 frames, and the share of samples from the second half of 16 videos x 500 frames
    on 8 ranks x 2 workers (batch 8)."""
    import numpy as np

    from surgenet_ssl.data.epochs import Catalog, epoch_order, epoch_steps, rank_batch_positions

    def videos(n: int, frames: int) -> Catalog:
        return Catalog(np.zeros(n, np.int64), np.full(n, frames, np.int64), [None] * n, [1.0])

    cat = videos(100, 200)
    shards = np.searchsorted(cat.shard_base, epoch_order(cat, 0, 0, 65536), side="right") - 1
    distinct = np.mean([len(set(shards[i : i + 64].tolist())) for i in range(0, 20_000 - 63, 64)])
    cat = videos(16, 500)
    order, steps = epoch_order(cat, 0, 0, 65536), epoch_steps(8000, 8, 8, None)
    ordinals = [
        cat.locate(int(order[p]))[1]
        for rank in range(8)
        for worker in range(2)
        for t in range(worker, steps, 2)
        for p in rank_batch_positions(0, t, rank, 8, 8)
    ]
    late = float(np.mean(np.array(ordinals) >= 250))
    return f"epoch order: {distinct:.1f} distinct videos per batch of 64 (100 x 200), second-half share {late:.3f}"


def _distinct_videos(args: argparse.Namespace, dataset: dict, transform) -> float:
    """Mean number of distinct videos in the batches of one epoch (keys are ``source/video/frame``; no decoding
    cost counted)."""
    loader = build_train_loader(
        dataset,
        args.cache,
        transform,
        batch_size=args.batch_size,
        num_workers=args.workers,
        steps_per_epoch=args.batches,
        shuffle_buffer=256,
        sampling=args.sampling,
    )
    counts = [len({k.rsplit("/", 1)[0] for k in batch["key"]}) for batch in loader]
    return sum(counts) / max(1, len(counts))


def _tensors(value) -> list[torch.Tensor]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


if __name__ == "__main__":
    main()

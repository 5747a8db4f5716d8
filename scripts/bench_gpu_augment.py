"""ATen ops per call of the GPU multi-crop augmentation (``data.augment_on=gpu``), and its time on CPU tensors.

Why ops: on a GPU each ATen op is at least one kernel launch, ~5-10 us of host time that cannot overlap with the
step when the augmentation runs in ``on_after_batch_transfer``; the count does not depend on the batch size, so it
is measured here on CPU tensors with a dispatch mode (every op the dispatcher sees, views included). The time on
CPU tensors is the CPU's compute, not the GPU's: ``scripts/gpu_report.py`` measures frames/s on a GPU.

    python scripts/bench_gpu_augment.py                   # recipe crops (2x224 + 8x96), batch 32, 320x568 canvas
    python scripts/bench_gpu_augment.py --batch 8 --iters 2

The LAST line is ``ops_per_call=<int> cpu_ms_per_call=<float> batch=<int>``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgenet_ssl.data.gpu_augment import GpuMultiCrop
from surgenet_ssl.runtime.performance import AtenOpCounter

# (valid h, w) of 4:3, 5:4, 1:1 and 16:9 frames in the 320x568 canvas (shorter side 320)
ASPECTS = ((320, 427), (320, 400), (320, 320), (320, 568))


def inputs(batch: int, canvas: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 canvases with the valid sizes of mixed-aspect frames, as the loader ships them."""
    g = torch.Generator().manual_seed(seed)
    ch, cw = canvas
    frames = torch.randint(0, 256, (batch, 3, ch, cw), generator=g, dtype=torch.uint8)
    scale = ch / 320
    sizes = torch.tensor([[round(h * scale), min(cw, round(w * scale))] for h, w in ASPECTS] * (batch // 4 + 1))
    return frames, sizes[:batch]


def ops_per_call(aug: GpuMultiCrop, frames: torch.Tensor, sizes: torch.Tensor) -> AtenOpCounter:
    """The ops of one warm call (the first call creates the per-device constants)."""
    g = torch.Generator().manual_seed(0)
    aug(frames, g, sizes=sizes)
    with AtenOpCounter() as counter:
        aug(frames, g, sizes=sizes)
    return counter


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--canvas", default="320x568", help="HxW of the uint8 canvas")
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=96)
    ap.add_argument("--local-number", type=int, default=8)
    ap.add_argument("--iters", type=int, default=3, help="timed calls on CPU tensors")
    ap.add_argument("--top", type=int, default=10, help="the most frequent ops to list")
    args = ap.parse_args(argv)
    canvas = tuple(int(v) for v in args.canvas.split("x"))
    frames, sizes = inputs(args.batch, (canvas[0], canvas[1]))
    aug = GpuMultiCrop(args.global_size, args.local_size, local_crops_number=args.local_number)
    counter = ops_per_call(aug, frames, sizes)
    for name, n in sorted(counter.counts.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{n:6d}  {name}")
    g = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for _ in range(args.iters):
        aug(frames, g, sizes=sizes)
    ms = (time.perf_counter() - start) / max(1, args.iters) * 1e3
    print(f"ops_per_call={counter.total} cpu_ms_per_call={ms:.1f} batch={args.batch}", flush=True)
    return {"ops_per_call": counter.total, "cpu_ms_per_call": ms, "batch": args.batch}


if __name__ == "__main__":
    main()

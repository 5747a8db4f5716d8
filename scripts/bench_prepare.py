"""Benchmark `prepare`: frames written per second for 1..N worker processes on generated H.264 videos.

    python scripts/bench_prepare.py [--videos 8] [--seconds 16] [--width 854] [--height 480] [--max-workers N]

Frames are sampled at 1 fps (as published) from 25-fps videos, so every written frame costs 25 decoded frames:
decoding dominates, as with real surgical video. The last line prints the figure (best frames/s and workers).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgenet_ssl.data.preparation import PrepareSettings, prepare_source  # noqa: E402


def make_videos(folder: Path, n: int, seconds: int, width: int, height: int, fps: int) -> None:
    """Videos of a panning noise texture with a moving bar: real motion for the codec, cheap to render."""
    import av

    folder.mkdir(parents=True, exist_ok=True)
    for v in range(n):
        rng = np.random.default_rng(v)
        small = rng.integers(0, 255, (height // 8 * 2, width // 8 * 2, 3), dtype=np.uint8)
        texture = np.repeat(np.repeat(small, 8, 0), 8, 1)
        with av.open(str(folder / f"video{v:03d}.mp4"), "w") as c:
            s = c.add_stream("libx264", rate=fps)
            s.width, s.height, s.pix_fmt = width, height, "yuv420p"
            s.options = {"preset": "ultrafast", "crf": "23"}
            for f in range(seconds * fps):
                ox, oy = (3 * f) % width, (2 * f) % height
                frame = np.ascontiguousarray(texture[oy : oy + height, ox : ox + width])
                frame[:, (5 * f) % width : (5 * f) % width + 20] = 255
                for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--seconds", type=int, default=16)
    ap.add_argument("--width", type=int, default=854)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--video-fps", type=int, default=25)
    ap.add_argument("--fps", type=float, default=1.0, help="sampling rate of prepare (published: 1)")
    ap.add_argument("--resize-short", type=int, default=320)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ap.add_argument("--max-workers", type=int, default=cpus)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--workdir", default=None, help="where to put videos and shards (default: a temp dir)")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_prepare_"))
    videos = work / "videos"
    t0 = time.time()
    make_videos(videos, args.videos, args.seconds, args.width, args.height, args.video_fps)
    print(
        f"generated {args.videos} videos of {args.seconds} s at {args.width}x{args.height}@{args.video_fps} fps "
        f"in {time.time() - t0:.1f} s ({work})"
    )
    settings = PrepareSettings(source="bench", fps=args.fps, resize_short=args.resize_short, backend=args.backend)
    results = []
    print(f"{'workers':>8} {'seconds':>8} {'frames':>7} {'frames/s':>9} {'video-s/s':>10}")
    for workers in range(1, max(1, args.max_workers) + 1):
        out = work / f"out_{workers}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.time()
        summary = prepare_source(videos, out, settings, workers=workers, progress=False)
        dt = time.time() - t
        fps = summary.frames_written_now / dt
        results.append((fps, workers))
        print(
            f"{workers:>8} {dt:>8.2f} {summary.frames_written_now:>7} {fps:>9.1f} "
            f"{args.videos * args.seconds / dt:>10.1f}"
        )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    best, workers = max(results)
    print(
        f"bench_prepare: {best:.1f} frames/s with {workers} workers "
        f"({args.width}x{args.height}@{args.video_fps} fps H.264 sampled at {args.fps:g} fps, "
        f"{results[0][0]:.1f} frames/s with 1 worker)"
    )


if __name__ == "__main__":
    main()

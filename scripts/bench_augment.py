"""Single-core throughput of the multi-crop augmentation, JPEG bytes -> normalised crops (2x224 + 8x96 by default).

Compares the fast OpenCV pipeline (the default backend) with the official PIL/torchvision pipeline on the same frames,
and with ``--ablation`` measures each design choice by putting the official kernel back for one stage at a time.
One process, one thread (torch and OpenCV). The LAST line is ``samples_per_s_per_core=<fast pipeline>``.

    python scripts/bench_augment.py                      # 32 synthetic 854x480 JPEGs
    python scripts/bench_augment.py --frames DIR         # your frames (*.jpg, *.jpeg, *.png; also DIR/<class>/)
    python scripts/bench_augment.py --size 569x320 --ablation
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgenet_ssl.data import augment as A
from surgenet_ssl.data import decode as D


def synthetic_frames(directory: Path, n: int, width: int, height: int, seed: int = 0) -> None:
    """Surgical-looking enough for JPEG statistics: smooth colour fields, texture, a dark vignette, specular dots."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(n):
        low = cv2.resize(
            rng.uniform(0, 255, (6, 10, 3)).astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC
        )
        texture = cv2.GaussianBlur(rng.normal(0, 30, (height, width, 3)).astype(np.float32), (0, 0), 1.2)
        r = np.hypot((x - width / 2) / (width / 2), (y - height / 2) / (height / 2))
        img = (low * 0.8 + texture) * np.clip(1.3 - r, 0, 1)[..., None]
        img[rng.integers(0, height, 40), rng.integers(0, width, 40)] = 255
        bgr = cv2.cvtColor(np.clip(img, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(directory / f"frame_{i:04d}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])


FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")


def find_frames(directory: Path, limit: int) -> list[Path]:
    """Up to ``limit`` frames of ``directory`` or of its sub-folders at any depth (an ImageFolder layout:
    ``DIR/<class>/<frame>``), taken round-robin over the folders so every class is in the sample."""
    by_folder: dict[Path, list[Path]] = {}
    for p in sorted(directory.rglob("*")):
        if p.suffix.lower() in FRAME_SUFFIXES and p.is_file() and not p.name.startswith("."):
            by_folder.setdefault(p.parent, []).append(p)
    queues = [files for _, files in sorted(by_folder.items())]
    picked: list[Path] = []
    for i in range(max((len(q) for q in queues), default=0)):
        picked.extend(q[i] for q in queues if i < len(q))
    return picked[:limit]


def load_frames(directory: Path, limit: int) -> list[bytes]:
    files = find_frames(directory, limit)
    if not files:
        raise SystemExit(f"no .jpg/.jpeg/.png frames in {directory} or its sub-folders")
    return [p.read_bytes() for p in files]


def throughput(fn: Callable[[bytes], object], frames: list[bytes], seconds: float) -> float:
    fn(frames[0])
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(frames[n % len(frames)])
        n += 1
    return n / (time.perf_counter() - start)


# --- official kernels, swapped into the fast pipeline one stage at a time (ablation) --------------------------------
def _pil_decode(data: bytes, min_short: int = 0) -> tuple[np.ndarray, bool]:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(img), False


def _pil_resize_crop(img: np.ndarray, top: int, left: int, h: int, w: int, size: int) -> np.ndarray:
    return np.array(Image.fromarray(img[top : top + h, left : left + w]).resize((size, size), Image.BICUBIC))


def _cubic_only(img: np.ndarray, top: int, left: int, h: int, w: int, size: int) -> np.ndarray:
    return cv2.resize(img[top : top + h, left : left + w], (size, size), interpolation=cv2.INTER_CUBIC)


def _resize_then_crop(img: np.ndarray, top: int, left: int, h: int, w: int, size: int) -> np.ndarray:
    """Resize the whole frame to the crop's scale first, then cut the crop (what crop-before-resize avoids)."""
    sx, sy = size / w, size / h
    big = cv2.resize(img, None, fx=sx, fy=sy, interpolation=cv2.INTER_CUBIC)
    t, lft = int(top * sy), int(left * sx)
    out = big[t : t + size, lft : lft + size]
    return out if out.shape[:2] == (size, size) else cv2.resize(out, (size, size))


def _pil_jitter_fns() -> tuple:
    import torchvision.transforms.functional as F

    def wrap(fn):
        return lambda img, f: np.array(fn(Image.fromarray(img), f))

    return (
        wrap(F.adjust_brightness),
        wrap(F.adjust_contrast),
        wrap(F.adjust_saturation),
        wrap(F.adjust_hue),
    )


def _pil_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return np.array(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=sigma)))


# Each entry replaces names in surgenet_ssl.data.augment, where the fast pipeline looks them up (decode_frame too:
# imported there from surgenet_ssl.data.decode).
ABLATIONS: dict[str, dict[str, object]] = {
    "decode: PIL instead of OpenCV": {"decode_frame": _pil_decode},
    "resize: PIL bicubic (antialiased)": {"resize_crop": _pil_resize_crop},
    "resize: OpenCV cubic only (aliased)": {"resize_crop": _cubic_only},
    "resize: whole frame, then crop": {"resize_crop": _resize_then_crop},
    "jitter: PIL/torchvision ops": {"_JITTER_FNS": None},
    "blur: PIL GaussianBlur": {"gaussian_blur": _pil_blur},
}


def fast_fn(aug: A.FastMultiCrop) -> Callable[[bytes], object]:
    return lambda b: aug(aug.decode(b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--frames",
        type=Path,
        help="folder of frames, or of class sub-folders of frames (default: generate synthetic JPEGs)",
    )
    ap.add_argument(
        "--n",
        type=int,
        default=32,
        help="synthetic frames to generate / frames to load",
    )
    ap.add_argument("--size", default="854x480", help="WxH of the synthetic frames")
    ap.add_argument("--seconds", type=float, default=4.0, help="time per measurement")
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=96)
    ap.add_argument("--local-number", type=int, default=8)
    ap.add_argument(
        "--ablation",
        action="store_true",
        help="also time each design choice (official kernel swapped in)",
    )
    ap.add_argument("--skip-official", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.frames is None:
            w, h = (int(v) for v in args.size.lower().split("x"))
            synthetic_frames(Path(tmp), args.n, w, h)
            frames_dir = Path(tmp)
        else:
            frames_dir = args.frames
        frames = load_frames(frames_dir, args.n)
    shape = D.decode_frame(frames[0])[0].shape
    kw = {
        "global_crops_size": args.global_size,
        "local_crops_size": args.local_size,
        "local_crops_number": args.local_number,
    }
    print(
        f"{len(frames)} frames of {shape[1]}x{shape[0]} ({'synthetic' if args.frames is None else frames_dir}); "
        f"crops 2x{args.global_size} + {args.local_number}x{args.local_size}; 1 thread"
    )

    results: dict[str, float] = {}
    decode_only = throughput(lambda b: D.decode_frame(b), frames, args.seconds / 2)
    print(f"{'decode only (OpenCV)':42s} {decode_only:8.1f} frames/s")
    if not args.skip_official:
        off = A.OfficialMultiCrop(**kw)
        results["official"] = throughput(lambda b: off(off.decode(b)), frames, args.seconds)
        print(f"{'official (PIL/torchvision)':42s} {results['official']:8.1f} frames/s   1.00x")
    fast = A.FastMultiCrop(**kw)
    results["fast"] = throughput(fast_fn(fast), frames, args.seconds)
    ref = results.get("official")

    def report(name: str, value: float) -> None:
        print(f"{name:42s} {value:8.1f} frames/s" + (f"   {value / ref:.2f}x" if ref else ""))

    report("fast (OpenCV, default)", results["fast"])
    if args.ablation:
        for name, patch in ABLATIONS.items():
            saved = {k: getattr(A, k) for k in patch}
            try:
                for k, v in patch.items():
                    setattr(A, k, _pil_jitter_fns() if k == "_JITTER_FNS" else v)
                report(
                    "  fast, but " + name,
                    throughput(fast_fn(A.FastMultiCrop(**kw)), frames, args.seconds),
                )
            finally:
                for k, v in saved.items():
                    setattr(A, k, v)
        no_reduce = A.FastMultiCrop(decode_min_short=0, **kw)
        forced = A.FastMultiCrop(decode_min_short=min(shape[:2]) // 2, **kw)
        report(
            "  fast, reduced decoding disabled",
            throughput(fast_fn(no_reduce), frames, args.seconds),
        )
        report(
            "  fast, decode forced to 1/2 (lower detail)",
            throughput(fast_fn(forced), frames, args.seconds),
        )
    if ref:
        print(f"speedup_vs_official={results['fast'] / ref:.2f}")
    print(f"samples_per_s_per_core={results['fast']:.1f}")


if __name__ == "__main__":
    main()

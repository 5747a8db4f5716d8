"""Single-core throughput of the multi-crop augmentation, JPEG bytes -> crops (2x224 + 8x96 by default).

Compares the fast OpenCV pipeline (the default backend) with the official PIL/torchvision pipeline on the same frames,
for float (normalised) and uint8 crops. One process, one thread (torch and OpenCV). The variants are measured
interleaved in rounds (each round times every variant for ``--seconds``, in a rotated order) and each ratio is the
median over rounds of the ratio measured within a round: on a shared machine the speed drifts by tens of percent
between minutes, much less within one round. ``--ablation`` adds variants that put an older or the official kernel
back for one stage; ``--profile`` adds where the time of the fast pipeline goes, per stage; ``--markdown`` prints
the results as the README's tables. The LAST line is ``samples_per_s_per_core=<fast pipeline, float output>``.

    python scripts/bench_augment.py                      # 32 synthetic 569x320 JPEGs (the size prepare stores)
    python scripts/bench_augment.py --frames DIR         # your frames (*.jpg, *.jpeg, *.png; also DIR/<class>/)
    python scripts/bench_augment.py --ablation --profile --markdown
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

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


def throughput(
    fn: Callable[[bytes], object], frames: list[bytes], seconds: float, warm_up: bool = True
) -> tuple[float, int]:
    """(frames/s, frames done) of ``fn`` over ``frames`` for about ``seconds`` (after one warm-up call)."""
    if warm_up:
        fn(frames[0])
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(frames[n % len(frames)])
        n += 1
    return n / (time.perf_counter() - start), n


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


def _bgr_decode(data: bytes, min_short: int = 0) -> tuple[np.ndarray, bool]:
    """The decode before issue 30: BGR from OpenCV, then a channel swap (frames this bench makes are not reduced)."""
    D.jpeg_info(data)
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), False


def _hue_lut(img: np.ndarray, factor: float) -> np.ndarray:
    """The hue shift before issue 30: a 3-channel lookup table over the HSV image."""
    shift = int(factor * 255)
    lut = np.stack([(np.arange(256) + shift) % 256, np.arange(256), np.arange(256)], axis=1).astype(np.uint8)
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)
    return cv2.cvtColor(cv2.LUT(hsv, lut.reshape(1, 256, 3)), cv2.COLOR_HSV2RGB_FULL)


_IDENTITY = np.arange(256, dtype=np.float32)


def _lut(values: np.ndarray) -> np.ndarray:
    return np.minimum(np.maximum(values, 0), 255).astype(np.uint8)


def _brightness_lut(img: np.ndarray, factor: float) -> np.ndarray:
    """Brightness as before: a lookup table (cv2.LUT, not vectorised; exactly PIL's values)."""
    return cv2.LUT(img, _lut(_IDENTITY * factor))


def _contrast_lut(img: np.ndarray, factor: float) -> np.ndarray:
    """Contrast as before: the luma mean, then a lookup table."""
    r, g, b, _ = cv2.mean(img)
    mean = int(0.299 * r + 0.587 * g + 0.114 * b + 0.5)
    return cv2.LUT(img, _lut(mean + (_IDENTITY - mean) * factor))


def _saturation_blend(img: np.ndarray, factor: float) -> np.ndarray:
    """The saturation before issue 30: gray, gray to RGB, then a weighted blend."""
    gray = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(img, factor, gray, 1.0 - factor, 0.0)


def _cv_gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)


def _channel_first_copy(crop: np.ndarray, normalise: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Crops before issue 30: made channel-first (a copy) in the worker."""
    t = torch.from_numpy(crop).permute(2, 0, 1).contiguous()
    if normalise is None:
        return t
    scale, shift = (v[:3].view(3, 1, 1) for v in normalise)  # the per-channel values of the repeated rows
    return t.float().mul_(scale).add_(shift)


# Each entry replaces names in surgenet_ssl.data.augment, where the fast pipeline looks them up (decode_frame too:
# imported there from surgenet_ssl.data.decode). "_JITTER_FNS" takes the four jitter ops.
ABLATIONS: dict[str, dict[str, object]] = {
    "decode: PIL instead of OpenCV": {"decode_frame": _pil_decode},
    "resize: PIL bicubic (antialiased)": {"resize_crop": _pil_resize_crop},
    "resize: OpenCV cubic only (aliased)": {"resize_crop": _cubic_only},
    "resize: whole frame, then crop": {"resize_crop": _resize_then_crop},
    "jitter: PIL/torchvision ops": {"_JITTER_FNS": "pil"},
    "blur: PIL GaussianBlur": {"gaussian_blur": _pil_blur},
    # the kernels before issue 30, one at a time
    "decode: BGR, then channel swap": {"decode_frame": _bgr_decode},
    "hue: 3-channel lookup table": {"_JITTER_FNS": "hue_lut"},
    "saturation: gray, gray to RGB, blend": {"_JITTER_FNS": "saturation_blend"},
    "brightness, contrast: lookup tables": {"_JITTER_FNS": "bc_lut"},
    "blur: cv2.GaussianBlur (fixed point)": {"gaussian_blur": _cv_gaussian_blur},
    "crops: channel-first copy in the worker": {"crop_tensor": _channel_first_copy},
}
# all of them at once (with the parameter dicts made for every crop): the fast pipeline as it was before issue 30
BEFORE_ISSUE_30: dict[str, object] = {
    "decode_frame": _bgr_decode,
    "_JITTER_FNS": "before_issue_30",
    "gaussian_blur": _cv_gaussian_blur,
    "crop_tensor": _channel_first_copy,
}


def _patch_value(value: object) -> object:
    """The jitter ops of the ``"_JITTER_FNS"`` names in ABLATIONS; anything else as it is."""
    if value == "pil":
        return _pil_jitter_fns()
    if value == "hue_lut":
        return (*A._JITTER_FNS[:3], _hue_lut)
    if value == "saturation_blend":
        return (*A._JITTER_FNS[:2], _saturation_blend, A._JITTER_FNS[3])
    if value == "bc_lut":
        return (_brightness_lut, _contrast_lut, *A._JITTER_FNS[2:])
    if value == "before_issue_30":
        return (_brightness_lut, _contrast_lut, _saturation_blend, _hue_lut)
    return value


@contextmanager
def patched(patch: dict[str, object]) -> Iterator[None]:
    """``patch`` applied to surgenet_ssl.data.augment for the duration."""
    saved = {k: getattr(A, k) for k in patch}
    try:
        for k, v in patch.items():
            setattr(A, k, _patch_value(v))
        yield
    finally:
        for k, v in saved.items():
            setattr(A, k, v)


class Variant(NamedTuple):
    """One measured pipeline: ``make()`` builds the per-frame function (inside ``patch``)."""

    name: str
    make: Callable[[], Callable[[bytes], object]]
    patch: dict[str, object] = {}  # never changed


def fast_fn(aug: A.FastMultiCrop, return_params: bool = False) -> Callable[[bytes], object]:
    return lambda b: aug(aug.decode(b), return_params=return_params)


def official_fn(aug: A.OfficialMultiCrop) -> Callable[[bytes], object]:
    return lambda b: aug(aug.decode(b))


def run_rounds(variants: list[Variant], frames: list[bytes], rounds: int, seconds: float) -> dict[str, list[float]]:
    """frames/s of every variant in every round; round ``r`` starts at variant ``r`` (rotated order)."""
    rates: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(rounds):
        for i in range(len(variants)):
            v = variants[(i + r) % len(variants)]
            with patched(v.patch):
                rates[v.name].append(throughput(v.make(), frames, seconds)[0])
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    return rates


def same_round_ratios(rates: dict[str, list[float]], ref: str) -> dict[str, list[float]]:
    return {name: [a / b for a, b in zip(values, rates[ref], strict=True)] for name, values in rates.items()}


# --- where the time goes ----------------------------------------------------------------------------------------
# stage -> the names in surgenet_ssl.data.augment it times ("_JITTER_FNS": index of the op in that tuple)
PROFILE_STAGES: dict[str, tuple[str, ...]] = {
    "JPEG decode": ("decode_frame",),
    "crop + resize": ("resize_crop",),
    "jitter: brightness": ("_JITTER_FNS", "0"),
    "jitter: contrast": ("_JITTER_FNS", "1"),
    "jitter: saturation": ("_JITTER_FNS", "2"),
    "jitter: hue": ("_JITTER_FNS", "3"),
    "grayscale": ("to_grayscale",),
    "Gaussian blur": ("gaussian_blur",),
    "solarize": ("solarize",),
    "to tensor (+ normalise)": ("crop_tensor",),
}
OTHER_STAGE = "draws, flip, Python glue"


def _timed(fn: Callable, stage: str, acc: dict[str, float]) -> Callable:
    def wrapper(*args: object) -> object:
        t = time.perf_counter()
        out = fn(*args)
        acc[stage] += time.perf_counter() - t
        return out

    return wrapper


def timed_patch(acc: dict[str, float]) -> dict[str, object]:
    """A patch of surgenet_ssl.data.augment (for :func:`patched`) that adds each stage's time to ``acc``."""
    patch: dict[str, object] = {}
    jitter = list(A._JITTER_FNS)
    for stage, (name, *index) in PROFILE_STAGES.items():
        if index:
            jitter[int(index[0])] = _timed(jitter[int(index[0])], stage, acc)
        else:
            patch[name] = _timed(getattr(A, name), stage, acc)
    patch["_JITTER_FNS"] = tuple(jitter)
    return patch


def profile(kw: dict[str, int], frames: list[bytes], rounds: int, seconds: float) -> dict[str, dict[str, float]]:
    """Microseconds per frame of each stage of the fast pipeline and ``total``, for float and uint8 output
    (interleaved rounds); ``OTHER_STAGE`` is the total less the timed stages."""
    out = {}
    stage_s = {label: defaultdict(float) for label in ("float", "uint8")}
    wall, done = dict.fromkeys(stage_s, 0.0), dict.fromkeys(stage_s, 0)
    for _ in range(rounds):
        for label, acc in stage_s.items():
            this_round: dict[str, float] = defaultdict(float)
            with patched(timed_patch(this_round)):
                fn = fast_fn(A.FastMultiCrop(uint8_output=label == "uint8", **kw))
                fn(frames[0])  # warm-up, not counted
                this_round.clear()
                t = time.perf_counter()
                n = throughput(fn, frames, seconds, warm_up=False)[1]
                wall[label] += time.perf_counter() - t
            done[label] += n
            for stage, t_stage in this_round.items():
                acc[stage] += t_stage
    for label, acc in stage_s.items():
        per = {stage: 1e6 * acc[stage] / done[label] for stage in PROFILE_STAGES}
        total = 1e6 * wall[label] / done[label]
        per[OTHER_STAGE] = max(0.0, total - sum(per.values()))
        per["total"] = total
        out[label] = per
    return out


def profile_markdown(prof: dict[str, dict[str, float]]) -> str:
    lines = [
        "| stage | float crops: us/frame | share | uint8 crops: us/frame | share |",
        "|---|---|---|---|---|",
    ]
    for stage in (*PROFILE_STAGES, OTHER_STAGE):
        cells = [f"{prof[k][stage]:.0f} | {100 * prof[k][stage] / prof[k]['total']:.0f}%" for k in ("float", "uint8")]
        lines.append(f"| {stage} | {' | '.join(cells)} |")
    totals = [f"**{prof[k]['total']:.0f}** | {1e6 / prof[k]['total']:.0f} frames/s" for k in ("float", "uint8")]
    lines.append(f"| **total** | {' | '.join(totals)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--frames",
        type=Path,
        help="folder of frames, or of class sub-folders of frames (default: generate synthetic JPEGs)",
    )
    ap.add_argument("--n", type=int, default=32, help="synthetic frames to generate / frames to load")
    ap.add_argument("--size", default="569x320", help="WxH of the synthetic frames (default: what prepare stores)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; every variant is timed once per round")
    ap.add_argument("--seconds", type=float, default=1.5, help="time per variant per round")
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=96)
    ap.add_argument("--local-number", type=int, default=8)
    ap.add_argument("--ablation", action="store_true", help="also time each design choice (another kernel swapped in)")
    ap.add_argument("--profile", action="store_true", help="also show where the fast pipeline's time goes, per stage")
    ap.add_argument("--markdown", action="store_true", help="print the results as markdown tables (the README's)")
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
        f"crops 2x{args.global_size} + {args.local_number}x{args.local_size}; 1 thread; "
        f"{args.rounds} rounds x {args.seconds:g} s per variant"
    )

    def fast(uint8: bool = False, **extra: object) -> Callable[[], Callable[[bytes], object]]:
        return lambda: fast_fn(A.FastMultiCrop(uint8_output=uint8, **kw, **extra))  # type: ignore[arg-type]

    variants: list[Variant] = []
    if not args.skip_official:
        variants.append(Variant("official (PIL/torchvision), float", lambda: official_fn(A.OfficialMultiCrop(**kw))))
        variants.append(
            Variant("official, uint8 crops", lambda: official_fn(A.OfficialMultiCrop(uint8_output=True, **kw)))
        )
    variants += [
        Variant("fast (OpenCV, default), float", fast()),
        Variant("fast, uint8 crops", fast(uint8=True)),
        Variant("decode only (OpenCV)", lambda: lambda b: D.decode_frame(b)),
    ]
    for uint8 in (False, True):  # the gain of issue 30's kernels, measured in the same rounds
        variants.append(
            Variant(
                f"fast as before issue 30, {'uint8 crops' if uint8 else 'float'}",
                lambda uint8=uint8: fast_fn(A.FastMultiCrop(uint8_output=uint8, **kw), return_params=True),
                BEFORE_ISSUE_30,
            )
        )
    if args.ablation:
        variants += [Variant("fast, but " + name, fast(), patch) for name, patch in ABLATIONS.items()]
        variants.append(
            Variant(
                "fast, but parameter dicts for every crop",
                lambda: fast_fn(A.FastMultiCrop(**kw), return_params=True),  # type: ignore[arg-type]
            )
        )
        variants.append(
            Variant("fast, but decode forced to 1/2 (lower detail)", fast(decode_min_short=min(shape[:2]) // 2))
        )
    rates = run_rounds(variants, frames, args.rounds, args.seconds)
    ref = variants[0].name
    ratios = same_round_ratios(rates, ref)
    fast_float = statistics.median(rates["fast (OpenCV, default), float"])
    pairs = {
        "fast_float_vs_before_issue_30": ("fast (OpenCV, default), float", "fast as before issue 30, float"),
        "fast_uint8_vs_before_issue_30": ("fast, uint8 crops", "fast as before issue 30, uint8 crops"),
    }

    rows = []
    for v in variants:
        r = ratios[v.name]
        rows.append((v.name, statistics.median(rates[v.name]), statistics.median(r), min(r), max(r)))
    if args.markdown:
        print(
            f"| variant | frames/s/core | vs {ref.split(' (')[0]} (median of same-round ratios) | range over rounds |"
        )
        print("|---|---|---|---|")
        for name, rate, med, lo, hi in rows:
            print(f"| {name} | {rate:.1f} | {med:.2f}x | {lo:.2f}-{hi:.2f}x |")
    else:
        print(f"{'variant':48s} {'frames/s':>9s} {'vs ' + ref.split(' (')[0]:>12s} {'range':>13s}")
        for name, rate, med, lo, hi in rows:
            print(f"{name:48s} {rate:9.1f} {med:11.2f}x {lo:6.2f}-{hi:.2f}x")
    if not args.skip_official:
        pairs["fast_float_vs_official_float"] = ("fast (OpenCV, default), float", ref)
        pairs["fast_uint8_vs_official_float"] = ("fast, uint8 crops", ref)
        pairs["fast_uint8_vs_official_uint8"] = ("fast, uint8 crops", "official, uint8 crops")
    for key, (a, b) in pairs.items():  # medians of same-round ratios
        print(f"{key}={statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True)):.2f}")
    if args.profile:
        prof = profile(kw, frames, args.rounds, args.seconds)
        print()
        if args.markdown:
            print(profile_markdown(prof))
        else:
            print(f"{'stage (fast pipeline)':32s} {'float us/frame':>15s} share {'uint8 us/frame':>15s} share")
            for stage in (*PROFILE_STAGES, OTHER_STAGE, "total"):
                f, u = prof["float"][stage], prof["uint8"][stage]
                print(
                    f"{stage:32s} {f:15.0f} {100 * f / prof['float']['total']:5.0f}% "
                    f"{u:15.0f} {100 * u / prof['uint8']['total']:5.0f}%"
                )
    print(f"samples_per_s_per_core={fast_float:.1f}")


if __name__ == "__main__":
    main()

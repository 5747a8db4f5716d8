"""Embedded demo dataset: synthetic surgical-style videos -> the real prepare pipeline -> shards + manifests.

A newcomer without data or GPU runs the same code path as a SurgeNetXL run: real video files (H.264 mp4, written
with PyAV) are decoded by decord through :func:`surgenet_ssl.data.preparation.prepare_source`, and the training
loader streams the resulting WebDataset shards. Three visibly different "procedures" (one source each, so the
source label is the procedure label for k-NN monitoring) x 3 videos x 10 s at 320x240:

- ``cholecystectomy``: laparoscopic view, circular endoscope vignette, liver-red tissue with yellow fat, two
  steel graspers.
- ``prostatectomy``: robotic view, full-frame deep-red tissue with vessels and specular highlights, two
  black-shafted wristed instruments, console overlay bar.
- ``gastric_bypass``: pale pink/orange bowel folds, wide offset vignette, a green-tipped stapler, drifting haze.

Each video is recorded in four segments with a different "camera look" each (white balance, exposure, saturation,
hue: as when the camera head is re-balanced or the light source changes, and as between hospitals). The look is the
nuisance that makes the demo a test of learning: an untrained network groups frames by their look (its online k-NN
on the procedure labels is 0.68-0.77 on init seeds 0-2, not 0.93 as without looks), and DINO, trained with colour-jitter
and grayscale views, is rewarded for ignoring it (the demo run's k-NN rises by 0.10-0.17 on seeds 0-2 with the
small-data preset, see the README "Small data").

Generation is deterministic (fixed seeds), about 3 MB, and takes a few seconds on 2 cores. Concurrent callers
(DDP ranks, parallel test runs) are safe: one builds under a file lock into a temporary directory that is renamed
into place when complete; the others wait and reuse it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from surgenet_ssl.data import shards as S
from surgenet_ssl.runtime.io_utils import build_dir_once

__all__ = ["ensure_demo_dataset", "DEMO_PROCEDURES", "DEMO_VERSION", "demo_is_complete", "write_demo_video"]

log = logging.getLogger(__name__)

DEMO_VERSION = 3  # bump when the generator changes: cached copies are rebuilt (2: camera looks, 3: same bytes)
_CONTENT_SEED = 1  # seeds the rendered scenes (unchanged since version 1); the looks have their own seed
_LOOK_SEED = 7
LOOK_SEGMENTS = 4  # camera looks per video (0: none)
DEMO_DIRNAME = "demo"
WIDTH, HEIGHT = 320, 240
VIDEO_FPS = 8
SECONDS = 10
VIDEOS_PER_PROCEDURE = 3
SAMPLE_FPS = 2.0  # frames per second kept by prepare: 20 per video, 180 in total


@dataclass(frozen=True)
class _Style:
    procedure: str
    tissue: tuple[tuple[int, int, int], ...]  # palette mixed by low-frequency noise
    vignette: str  # "circle" | "wide" | "none"
    instrument: str  # "grasper" | "robotic" | "stapler"
    highlights: int
    haze: bool
    overlay: bool
    speed: float


DEMO_PROCEDURES: dict[str, _Style] = {
    "cholecystectomy": _Style(
        "laparoscopic cholecystectomy (synthetic)",
        ((150, 40, 35), (205, 90, 80), (225, 190, 90), (120, 25, 30)), "circle", "grasper", 12, False, False, 1.0,
    ),
    "prostatectomy": _Style(
        "robot-assisted prostatectomy (synthetic)",
        ((110, 10, 20), (170, 30, 40), (200, 70, 70), (80, 5, 15)), "none", "robotic", 40, False, True, 1.6,
    ),
    "gastric_bypass": _Style(
        "laparoscopic gastric bypass (synthetic)",
        ((230, 160, 140), (245, 190, 160), (210, 120, 110), (240, 210, 170)), "wide", "stapler", 6, True, False, 0.6,
    ),
}  # fmt: skip


# -------------------------------------------------------------------------------------------------- rendering
def _noise(rng: np.random.Generator, h: int, w: int, scale: int) -> np.ndarray:
    """Smooth noise in [0, 1]: random values on a coarse grid, bicubically upsampled."""
    small = rng.random((max(2, h // scale), max(2, w // scale))).astype(np.float32)
    img = Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def _tissue(style: _Style, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A large tissue texture (HxWx3 uint8) to pan the camera over."""
    palette = np.array(style.tissue, dtype=np.float32)
    fields = np.stack([_noise(rng, h, w, 48) + 0.5 * _noise(rng, h, w, 12) for _ in palette], axis=-1)
    weights = np.exp(6.0 * fields)
    weights /= weights.sum(-1, keepdims=True)
    img = weights @ palette
    img *= (0.75 + 0.35 * _noise(rng, h, w, 6))[..., None]  # fine texture
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    if style.instrument == "robotic":  # vessels
        for _ in range(14):
            pts = np.cumsum(rng.normal(0, 14, (8, 2)), axis=0) + rng.random(2) * (w, h)
            draw.line([tuple(p) for p in pts], fill=(90, 0, 25), width=int(rng.integers(2, 5)))
    for _ in range(style.highlights):  # wet specular reflections
        x, y, r = rng.random() * w, rng.random() * h, rng.uniform(2, 6)
        draw.ellipse((x - r, y - r * 0.6, x + r, y + r * 0.6), fill=(255, 245, 240))
    return np.asarray(pil.filter(ImageFilter.GaussianBlur(1.2)))


def _vignette(kind: str, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    cx, cy = WIDTH / 2, HEIGHT / 2
    if kind == "circle":
        r = np.hypot(xx - cx, yy - cy) / (HEIGHT * 0.55)
        return np.clip((1.0 - r) * 12.0, 0, 1) * np.clip(1.15 - 0.5 * r**2, 0, 1)
    if kind == "wide":
        cx += rng.uniform(-20, 20)
        r = np.hypot((xx - cx) / WIDTH, (yy - cy) / HEIGHT) / 0.62
        return np.clip((1.0 - r) * 6.0, 0, 1) * np.clip(1.1 - 0.4 * r**2, 0, 1)
    r = np.hypot((xx - cx) / WIDTH, (yy - cy) / HEIGHT)
    return np.clip(1.05 - 0.6 * r**2, 0, 1)


def _instrument(
    draw: ImageDraw.ImageDraw, kind: str, base: tuple[float, float], tip: tuple[float, float], t: float
) -> None:
    (bx, by), (tx, ty) = base, tip
    d = np.array([tx - bx, ty - by], dtype=np.float32)
    d /= np.linalg.norm(d) + 1e-6
    n = np.array([-d[1], d[0]])
    width = {"grasper": 9, "robotic": 12, "stapler": 16}[kind]
    shaft = {"grasper": (150, 155, 160), "robotic": (25, 25, 28), "stapler": (60, 60, 65)}[kind]
    quad = [
        tuple(np.array(base) + n * width),
        tuple(np.array(tip) + n * width * 0.8),
        tuple(np.array(tip) - n * width * 0.8),
        tuple(np.array(base) - n * width),
    ]
    draw.polygon(quad, fill=shaft)
    glint = [tuple(np.array(base) + n * width * 0.3), tuple(np.array(tip) + n * width * 0.3)]
    draw.line(glint, fill=(220, 220, 225), width=2)
    opening = 0.35 + 0.3 * np.sin(t * 3.0)
    jaw_len = {"grasper": 22, "robotic": 16, "stapler": 34}[kind]
    jaw = {"grasper": (185, 190, 195), "robotic": (170, 170, 175), "stapler": (40, 160, 90)}[kind]
    if kind == "robotic":  # metallic wrist
        draw.ellipse((tx - 8, ty - 8, tx + 8, ty + 8), fill=(140, 140, 150))
    for sign in (1, -1):
        ang = sign * opening * (0.3 if kind == "stapler" else 1.0)
        rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
        dj = rot @ d
        end = (tx + dj[0] * jaw_len, ty + dj[1] * jaw_len)
        draw.line([(tx, ty), end], fill=jaw, width=5 if kind != "stapler" else 9)


def _render_video(name: str, style: _Style, index: int) -> list[np.ndarray]:
    seed = [_CONTENT_SEED, list(DEMO_PROCEDURES).index(name), index]
    rng = np.random.default_rng(seed)
    big = _tissue(style, rng, HEIGHT * 2, WIDTH * 2)
    vignette = _vignette(style.vignette, rng)[..., None]
    n = VIDEO_FPS * SECONDS
    phase = rng.uniform(0, 2 * np.pi, 6)
    frames = []
    for f in range(n):
        t = f / VIDEO_FPS * style.speed
        ox = int((WIDTH / 2) * (1 + 0.9 * np.sin(0.23 * t + phase[0])))
        oy = int((HEIGHT / 2) * (1 + 0.9 * np.sin(0.19 * t + phase[1])))
        view = Image.fromarray(big[oy : oy + HEIGHT, ox : ox + WIDTH])
        draw = ImageDraw.Draw(view)
        bottom, top = [(-10, HEIGHT + 10), (WIDTH + 10, HEIGHT + 10)], [(-10, -10), (WIDTH + 10, -10)]
        bases = top if style.instrument == "robotic" else bottom
        for k, b in enumerate(bases[: 1 if style.instrument == "stapler" else 2]):
            tip = (
                WIDTH * (0.35 + 0.3 * k) + 40 * np.sin(0.9 * t + phase[2 + k]),
                HEIGHT * 0.5 + 35 * np.cos(0.7 * t + phase[4 + k]),
            )
            _instrument(draw, style.instrument, b, tip, t + k)
        if style.overlay:
            draw.rectangle((0, HEIGHT - 14, WIDTH, HEIGHT), fill=(15, 15, 20))
            draw.rectangle((8, HEIGHT - 10, 8 + 40 + (f % 30), HEIGHT - 4), fill=(40, 120, 200))
        img = np.asarray(view, dtype=np.float32)
        if style.haze:
            img = img * 0.8 + 255 * 0.2 * (0.5 + 0.5 * np.sin(0.5 * t + phase[5]))
        frames.append((img * vignette).clip(0, 255).astype(np.uint8))
    look_rng = np.random.default_rng([_LOOK_SEED, list(DEMO_PROCEDURES).index(name), index])
    per_look = n // max(LOOK_SEGMENTS, 1)
    for k in range(LOOK_SEGMENTS):  # 0: no looks (version 1's frames)
        look = _CameraLook.draw(look_rng)
        frames[k * per_look : (k + 1) * per_look] = [look.apply(f) for f in frames[k * per_look : (k + 1) * per_look]]
    return frames


@dataclass(frozen=True)
class _CameraLook:
    """White balance (per-channel gains), exposure, saturation and hue shift of one recording segment."""

    gains: tuple[float, float, float]
    exposure: float
    saturation: float
    hue: float  # OpenCV hue units (0..180 = 0..360 degrees)

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _CameraLook:
        gains = rng.uniform(0.65, 1.35, 3)
        return cls(
            (float(gains[0]), float(gains[1]), float(gains[2])),
            float(rng.uniform(0.65, 1.25)),
            float(rng.uniform(0.5, 1.3)),
            float(rng.uniform(-12, 12)),
        )

    def apply(self, frame: np.ndarray) -> np.ndarray:
        import cv2

        balanced = frame.astype(np.float32) * np.asarray(self.gains) * self.exposure
        hsv = cv2.cvtColor(balanced.clip(0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
        hsv[..., 0] = (hsv[..., 0] + self.hue) % 180
        hsv[..., 1] = (hsv[..., 1] * self.saturation).clip(0, 255)
        return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def write_demo_video(path: Path, frames: list[np.ndarray], fps: int = VIDEO_FPS) -> None:
    """Encode RGB frames as an H.264 mp4 that is the same bytes on every run. x264's macroblock-tree rate control
    (``mbtree``, on by default with ``crf``) is not: the same frames encoded twice in one process gave three
    different streams (about 2 grey levels per pixel apart after decoding), and the demo's 96 training steps
    amplify that into a different k-NN gain (+0.08 to +0.20) and feature rank. With it off, and one encoder
    thread, the bytes repeat whatever the run or the thread environment (tests/data/test_data_demo.py)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "threads": "1", "x264-params": "mbtree=0"}
        stream.codec_context.thread_count = 1
        stream.codec_context.thread_type = "NONE"
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# -------------------------------------------------------------------------------------------------------- cache
def demo_is_complete(directory: str | Path) -> bool:
    """True if ``directory`` holds a finished demo of the current version (checks manifests and shard files)."""
    directory = Path(directory)
    try:
        top = S.read_manifest(directory)
        if top.get("demo_version") != DEMO_VERSION or not top.get("complete"):
            return False
        for rel in top["sources"].values():
            m = S.read_manifest(directory / rel)
            if not m.get("complete") or not all((directory / rel / s["file"]).is_file() for s in m["shards"]):
                return False
    except (S.ManifestError, KeyError, TypeError, AttributeError):
        return False
    return True


def _build(tmp: Path) -> None:
    from surgenet_ssl.data.preparation import PrepareSettings, prepare_source

    sources = {}
    total = 0
    for name, style in DEMO_PROCEDURES.items():
        video_dir = tmp / "videos" / name
        video_dir.mkdir(parents=True)
        for i in range(VIDEOS_PER_PROCEDURE):
            write_demo_video(video_dir / f"{name}_{i + 1:02d}.mp4", _render_video(name, style, i))
        settings = PrepareSettings(source=name, procedure=style.procedure, fps=SAMPLE_FPS, backend="auto")
        summary = prepare_source(video_dir, tmp / name, settings, workers=0, progress=False)
        if summary.units_failed or summary.frames_total == 0:
            raise RuntimeError(f"demo generation failed for {name}: {summary.units_failed}")
        sources[name] = name
        total += summary.frames_total
    S.write_json_atomic(
        tmp / S.MANIFEST_NAME,
        {
            "format": S.COLLECTION_FORMAT,
            "version": S.MANIFEST_VERSION,
            "demo_version": DEMO_VERSION,
            "complete": True,
            "sources": sources,
            "frames": total,
            "description": "surgenet-ssl embedded demo: synthetic surgical-style videos, one source per procedure",
        },
    )


def ensure_demo_dataset(root: str | Path, timeout_s: float = 600.0) -> Path:
    """Return ``<root>/demo``, generating it first if it is missing, incomplete or from an older version."""
    target = Path(root).expanduser() / DEMO_DIRNAME
    t0 = time.time()

    def build(tmp: Path) -> None:
        log.info("generating the demo dataset in %s (one-off, a few seconds)", target)
        _build(tmp)

    if build_dir_once(target, demo_is_complete, build, timeout_s):
        frames = json.loads((target / S.MANIFEST_NAME).read_text())["frames"]
        log.info("demo dataset ready: %d frames in %.1f s", frames, time.time() - t0)
    return target

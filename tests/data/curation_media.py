"""Generated frames of each kind curation must tell apart: endoscopic views (the demo's three synthetic procedures,
with their camera looks), black frames and fades, title cards, flat screens, operating-room views, blurred and
smoke-filled frames, and near-duplicates (a frame re-encoded with sensor noise) vs frames a second apart."""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image, ImageDraw

from surgenet_ssl.data.demo import DEMO_PROCEDURES, SAMPLE_FPS, VIDEO_FPS, _render_video


def endoscopic_videos() -> dict[str, list[np.ndarray]]:
    """The first demo video of each procedure, as its 1-fps frames (every 8th of 80 at 8 fps): 10 frames each."""
    step = VIDEO_FPS  # one frame a second
    return {name: _render_video(name, style, 0)[::step] for name, style in DEMO_PROCEDURES.items()}


def endoscopic_frames() -> list[np.ndarray]:
    return [f for frames in endoscopic_videos().values() for f in frames]


def jpeg_roundtrip(rgb: np.ndarray, quality: int = 90) -> np.ndarray:
    """As stored by prepare (JPEG q90)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def black_frames(rng: np.random.Generator) -> list[np.ndarray]:
    """Pure black, sensor-noise black, and a fade to black (a tenth of the brightness of a surgical frame)."""
    noisy = rng.integers(0, 12, (240, 320, 3)).astype(np.uint8)
    fade = (endoscopic_frames()[3].astype(np.float32) * 0.08).astype(np.uint8)
    return [np.zeros((240, 320, 3), np.uint8), noisy, fade]


def title_cards() -> list[np.ndarray]:
    """White or coloured text on black or on a flat colour, as opening cards of uploaded videos."""
    cards = []
    for bg, fg in (((0, 0, 0), (255, 255, 255)), ((0, 0, 0), (255, 210, 0)), ((20, 40, 120), (255, 255, 255))):
        img = Image.new("RGB", (320, 240), bg)
        draw = ImageDraw.Draw(img)
        draw.text((40, 90), "Laparoscopic cholecystectomy", fill=fg)
        draw.text((80, 120), "Dr. A. Surgeon - 2019", fill=fg)
        cards.append(np.asarray(img))
    return cards


def flat_frames() -> list[np.ndarray]:
    """A grey test screen and a blue 'no signal' screen: one colour, no information."""
    return [np.full((240, 320, 3), (128, 128, 128), np.uint8), np.full((240, 320, 3), (10, 30, 200), np.uint8)]


def operating_room_frames(rng: np.random.Generator, n: int = 6) -> list[np.ndarray]:
    """Views of the operating room when the scope is out: light walls, green/blue drapes and gowns, a surgical lamp,
    a steel table and monitors, in varied layouts and exposures."""
    frames = []
    for _ in range(n):
        wall = tuple(int(v) for v in rng.integers(150, 220, 3) * np.array([0.9, 1.0, 1.0]))
        img = Image.new("RGB", (320, 240), wall)
        draw = ImageDraw.Draw(img)
        floor = int(rng.integers(150, 200))
        draw.rectangle((0, floor, 320, 240), fill=tuple(int(v) for v in rng.integers(90, 140, 3)))
        drape = (int(rng.integers(20, 60)), int(rng.integers(110, 160)), int(rng.integers(90, 150)))
        x0 = int(rng.integers(0, 120))
        draw.rectangle((x0, 120, x0 + 200, 240), fill=drape)  # the draped table
        for _ in range(2):  # staff in blue gowns
            x = int(rng.integers(0, 280))
            draw.rectangle((x, 60, x + 45, 240), fill=(40, 80, int(rng.integers(130, 190))))
            draw.ellipse((x + 8, 30, x + 36, 62), fill=(60, 100, 160))  # cap and mask
        lx, ly = int(rng.integers(40, 280)), int(rng.integers(10, 60))
        draw.ellipse((lx - 30, ly - 18, lx + 30, ly + 18), fill=(245, 245, 240))  # lamp
        draw.rectangle((230, 70, 300, 120), fill=(30, 30, 35))  # monitor
        draw.rectangle((40, 150, 120, 160), fill=(190, 195, 200))  # steel tray
        arr = np.asarray(img).astype(np.float32) * rng.uniform(0.7, 1.15)
        arr += rng.normal(0, 4, arr.shape)
        frames.append(cv2.GaussianBlur(arr.clip(0, 255).astype(np.uint8), (0, 0), 0.8))
    return frames


def blurred(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """Out of focus / motion: a Gaussian blur of ``sigma`` px at the demo's 320x240."""
    return cv2.GaussianBlur(rgb, (0, 0), sigma)


def smoke(rgb: np.ndarray, density: float = 0.6) -> np.ndarray:
    """Surgical smoke: a bright veil over a blurred view (electrocautery plume), inside the scope's field of view
    (the optical vignette stays dark)."""
    field = (cv2.GaussianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (0, 0), 8) >= 24).astype(np.float32)
    alpha = cv2.GaussianBlur(field, (0, 0), 3)[..., None] * density  # dark instruments inside are veiled too
    veil = blurred(rgb, 4.0).astype(np.float32) * (1 - alpha) + 230 * alpha
    return veil.clip(0, 255).astype(np.uint8)


def near_duplicate(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same view a moment later in a static stretch: sensor noise, a slight exposure change, re-encoded."""
    noisy = rgb.astype(np.float32) * rng.uniform(0.97, 1.03) + rng.normal(0, 3, rgb.shape)
    return jpeg_roundtrip(noisy.clip(0, 255).astype(np.uint8), quality=85)


__all__ = [
    "SAMPLE_FPS",
    "black_frames",
    "blurred",
    "encode_jpeg",
    "endoscopic_frames",
    "endoscopic_videos",
    "flat_frames",
    "jpeg_roundtrip",
    "near_duplicate",
    "operating_room_frames",
    "smoke",
    "title_cards",
    "write_frames_source",
]


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_frames_source(root, name: str, videos: dict, fps: float | None = 1.0, shard_max: int = 1000):
    """A prepared source written directly: ``videos`` maps a video id to its frames in order (HxWx3 arrays, stored as
    JPEG q90 like prepare; raw bytes are stored as they are, e.g. a corrupt frame). Keys ``<video>/<k:08d>``."""
    import json

    from surgenet_ssl.data.shards import MANIFEST_FORMAT, MANIFEST_VERSION, ShardWriter, write_json_atomic

    out = root / name
    shards = []
    for video, frames in videos.items():
        w = ShardWriter(out, f"shards/{video}", video, shard_max)
        for k, frame in enumerate(frames):
            jpg = frame if isinstance(frame, bytes) else encode_jpeg(frame)
            meta = {"source": name, "video": video, "frame_index": k, "timestamp": k / (fps or 1.0)}
            w.write(f"{video}/{k:08d}", {"jpg": jpg, "json": json.dumps(meta).encode()})
        shards += [s.to_dict() for s in w.close()]
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "source": name,
        "procedure": "test",
        "complete": True,
        "frames": sum(s["frames"] for s in shards),
        "videos": len(videos),
        "inputs": len(videos),
        "pending": 0,
        "settings": {"fps": fps},
        "skipped": {"inputs": [], "corrupt_images": 0},
        "shards": shards,
    }
    write_json_atomic(out / "manifest.json", manifest)
    return out

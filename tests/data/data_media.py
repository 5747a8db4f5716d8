"""Test media generated on the fly: videos whose frames encode their own index, image folders, damaged files."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

# (file name, codec, pixel format, width, height): several containers/codecs, odd resolutions where allowed.
VIDEO_KINDS = [
    ("h264.mp4", "libx264", "yuv420p", 64, 48),
    ("mjpeg.avi", "mjpeg", "yuvj420p", 66, 50),
    ("ffv1_odd.mkv", "ffv1", "yuv444p", 63, 47),
    ("mpeg4.mov", "mpeg4", "yuv420p", 80, 44),
    ("vp9.mkv", "libvpx-vp9", "yuv420p", 64, 48),
]


def level_of(index: int) -> int:
    """Brightness that encodes a frame index (robust to lossy coding: 4 grey levels apart)."""
    return 10 + 4 * index


def index_of(image: np.ndarray) -> int:
    return int(round((float(image[4:-4, 4:-4].mean()) - 10) / 4))


def write_video(
    path: Path,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    width: int = 64,
    height: int = 48,
    frames: int = 50,
    fps: int = 25,
) -> Path:
    """A video whose frame i is uniformly grey at level_of(i) (frames <= 60)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = width, height, pix_fmt
        s.bit_rate = 4_000_000  # near-lossless: the grey level must survive coding
        if codec == "libx264":
            s.options = {"threads": "1", "crf": "10"}
        for i in range(frames):
            img = np.full((height, width, 3), level_of(i), np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def write_picture_video(
    path: Path, picture: np.ndarray, frames: int = 10, rotation: int | None = None, pixel_aspect: tuple | None = None
) -> Path:
    """A constant-picture H.264 video (``picture``: HxWx3 as stored) with a display rotation (degrees
    counter-clockwise, written as the container's display matrix, as phones do) and/or a sample aspect ratio."""
    from fractions import Fraction

    import av

    height, width = picture.shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {"threads": "1", "crf": "10"}
        if rotation is not None:
            s.set_display_rotation(rotation)
        if pixel_aspect is not None:
            s.sample_aspect_ratio = s.codec_context.sample_aspect_ratio = Fraction(*pixel_aspect)
        for _ in range(frames):
            for p in s.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def time_level(t: float) -> int:
    """Brightness that encodes a presentation time in seconds (t < 12)."""
    return int(round(10 + 20 * t))


def time_of(image: np.ndarray) -> float:
    return (float(image[4:-4, 4:-4].mean()) - 10) / 20


def write_vfr_video(path: Path, segments: list[tuple[float, int]]) -> list[float]:
    """A variable-frame-rate video: ``segments`` of (seconds, fps) one after the other, explicit timestamps (ms),
    each frame uniformly grey at time_level(its time). Returns the frame times."""
    from fractions import Fraction

    import av

    times: list[float] = []
    t = 0.0
    for seconds, rate in segments:
        for _ in range(round(seconds * rate)):
            times.append(round(t, 6))
            t += 1 / rate
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=max(r for _, r in segments))
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.time_base = s.codec_context.time_base = Fraction(1, 1000)
        s.options = {"threads": "1", "crf": "10"}
        for t in times:
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), time_level(t), np.uint8), format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return times


def write_images(folder: Path, n: int, size: tuple[int, int] = (40, 30), names: str = "frame_{i}.png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    rng = np.random.default_rng(len(str(folder)) + n)
    for i in range(n):
        p = folder / names.format(i=i)
        arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(p)
        out.append(p)
    return out


def tiny_jpeg(value: int, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    color = value if mode == "L" else ((value, 255 - value, 50, 0) if mode == "CMYK" else (value, 255 - value, 50))
    Image.new(mode, size, color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_source(
    root: Path, name: str, videos: int, frames_per_video: int, shard_max: int = 1000, corrupt: set[str] | None = None
) -> Path:
    """A prepared source written directly (fast): <root>/<name>/shards/*.tar + manifest.json.

    Frame ``k`` of video ``v`` has key ``v{v:02d}/{k:08d}``; keys in ``corrupt`` get non-JPEG bytes.
    """
    from surgenet_ssl.data.shards import MANIFEST_FORMAT, MANIFEST_VERSION, ShardWriter, write_json_atomic

    out = root / name
    shards = []
    corrupt = corrupt or set()
    for v in range(videos):
        w = ShardWriter(out, f"shards/v{v:02d}", f"v{v:02d}", shard_max)
        for k in range(frames_per_video):
            key = f"v{v:02d}/{k:08d}"
            jpg = b"\xff\xd8broken" if key in corrupt else tiny_jpeg((v * 37 + k) % 256)
            w.write(key, {"jpg": jpg, "json": json.dumps({"source": name, "frame_index": k}).encode()})
        shards += [s.to_dict() for s in w.close()]
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "source": name,
        "procedure": "test",
        "complete": True,
        "frames": videos * frames_per_video,
        "videos": videos,
        "inputs": videos,
        "pending": 0,
        "settings": {},
        "skipped": {"inputs": [], "corrupt_images": 0},
        "shards": shards,
    }
    write_json_atomic(out / "manifest.json", manifest)
    return out


def truncate(path: Path, keep_bytes: int) -> None:
    data = path.read_bytes()[:keep_bytes]
    path.write_bytes(data)


def tar_member_names(path: Path) -> list[str]:
    with tarfile.open(path) as t:
        return t.getnames()

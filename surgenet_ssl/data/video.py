"""Decode sampled frames from videos (decord, PyAV fallback) as RGB uint8 arrays; resize frames for storage.

Two sampling rules (``sampling=``): ``surgenet``, the SurgeNet authors' extraction, keeps the frames whose index is
a multiple of ``int(video_fps / fps)`` (at 1 fps: every ``int(fps)``-th frame, 29 at 29.97 fps), so a rebuild picks
their frames; ``round`` keeps multiples of ``round(video_fps / fps)`` (30 at 29.97 fps: closer to one frame per
second of video time). An explicit set of frame indices (a frame list) replaces both. The frame index and its
timestamp become the frame's stable key.
decord is fast at sparse access but has wheels for x86-64 only and fails on some containers; PyAV decodes
everything sequentially (slower, but robust) and takes over when decord is missing, cannot open a file or breaks
mid-way. Image files and encoded frames are decoded by :mod:`surgenet_ssl.data.decode`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "VIDEO_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "VideoDecodeError",
    "DecodedFrame",
    "DecodeReport",
    "SAMPLING_RULES",
    "sampling_step",
    "iter_video_frames",
    "resize_short_side",
    "decord_available",
]

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".webm", ".wmv", ".flv", ".ts", ".mts")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_CHUNK = 16  # frames per decord batch: bounds memory (16 full-HD RGB frames = 100 MB) whatever the video length


class VideoDecodeError(RuntimeError):
    """A video cannot be decoded at all (corrupt, empty, unsupported)."""


@dataclass
class DecodedFrame:
    index: int  # frame index in the video (presentation order)
    timestamp: float | None  # seconds from the start of the stream
    image: np.ndarray  # HxWx3 uint8 RGB


@dataclass
class DecodeReport:
    """How a video was decoded: which backend, its native fps/frame count, and any non-fatal problems."""

    backend: str = ""
    video_fps: float = 0.0
    num_frames: int | None = None
    step: int = 1
    warnings: list[str] = field(default_factory=list)


def decord_available() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


SAMPLING_RULES = ("surgenet", "round")


def sampling_step(video_fps: float, fps: float | None, rule: str = "round") -> int:
    """Keep every ``step``-th frame: ``int(video_fps / fps)`` (``surgenet``) or ``round(video_fps / fps)``
    (``round``); 1 when ``fps`` is None/0 (every frame) or the video's rate is unknown."""
    if rule not in SAMPLING_RULES:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLING_RULES)}, got {rule!r}")
    if not fps or fps <= 0:
        return 1
    if not video_fps or not math.isfinite(video_fps) or video_fps <= 0:
        return 1
    ratio = video_fps / fps
    return max(1, int(ratio + 1e-9) if rule == "surgenet" else int(round(ratio)))


@contextlib.contextmanager
def _native_stderr_captured() -> Iterator[list[str]]:
    """Capture what native code writes to file descriptor 2 meanwhile (the lines are in the yielded list after).

    Why: decord's C++ reader prints "video_reader.cc:83: ERROR opening: ..." straight to fd 2 on a corrupt video,
    past Python and its log level, through the progress bar; the reason belongs in our one warning instead.
    """
    lines: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2 (embedded interpreters): capture nothing
        yield lines
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(line for line in tmp.read().decode(errors="replace").splitlines() if line.strip())


def _native_reason(lines: list[str], path: Path) -> str:
    """decord's last error line without its time stamp, source location and the (already known) path."""
    if not lines:
        return ""
    text = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", lines[-1].strip())
    return text.split(f"{path}, ", 1)[-1].strip()


def _iter_decord(
    path: Path,
    fps: float | None,
    threads: int,
    report: DecodeReport,
    start: int = 0,
    rule: str = "round",
    keep: set[int] | None = None,
) -> Iterator[DecodedFrame]:
    import decord

    decord.logging.set_level(decord.logging.QUIET)
    opened: Exception | None = None
    with _native_stderr_captured() as native:
        try:
            vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=threads)
        except Exception as e:  # decord raises DECORDError / RuntimeError with little detail ("Error reading <path>")
            opened = e
    if opened is not None:
        reason = _native_reason(native, path)
        raise VideoDecodeError(f"cannot open it ({reason})" if reason else "cannot open it") from opened
    for line in native:
        log.debug("decord: %s", line)
    n = len(vr)
    report.backend, report.num_frames, report.video_fps = "decord", n, float(vr.get_avg_fps())
    if n == 0:
        raise VideoDecodeError("the video has no frames")
    step = report.step = sampling_step(report.video_fps, fps, rule)
    indices = [i for i in range(0, n, step) if i >= start and (keep is None or i in keep)]
    for lo in range(0, len(indices), _CHUNK):
        chunk = indices[lo : lo + _CHUNK]
        batch = vr.get_batch(chunk).asnumpy()
        stamps = vr.get_frame_timestamp(chunk)[:, 0]
        for i, img, t in zip(chunk, batch, stamps, strict=True):
            yield DecodedFrame(int(i), round(float(t), 6), np.ascontiguousarray(img))


def _av_message(e: BaseException) -> str:
    """FFmpeg's own words ("Invalid data found when processing input") without errno noise."""
    text = getattr(e, "strerror", None) or str(e)
    return f"{type(e).__name__}: {text}"


def _iter_pyav(
    path: Path,
    fps: float | None,
    threads: int,
    report: DecodeReport,
    start: int = 0,
    rule: str = "round",
    keep: set[int] | None = None,
) -> Iterator[DecodedFrame]:
    import av

    av.logging.set_level(None)  # FFmpeg messages go to our warnings, not to the terminal
    try:
        container = av.open(str(path))
    except Exception as e:
        raise VideoDecodeError(f"cannot open it: {_av_message(e)}") from e
    with container:
        if not container.streams.video:
            raise VideoDecodeError("the file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if threads:
            stream.thread_count = threads
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        report.backend, report.video_fps = "pyav", float(rate) if rate else 0.0
        report.num_frames = stream.frames or None
        step = report.step = sampling_step(report.video_fps, fps, rule)
        index = -1
        try:
            for frame in container.decode(stream):
                index += 1
                if index % step or index < start or (keep is not None and index not in keep):
                    continue
                t = float(frame.time) if frame.time is not None else index / (report.video_fps or 1.0)
                yield DecodedFrame(index, round(t, 6), frame.to_ndarray(format="rgb24"))
        except (av.error.FFmpegError, ValueError, RuntimeError) as e:
            if index < 0:
                raise VideoDecodeError(f"no frame could be decoded: {_av_message(e)}") from e
            report.warnings.append(f"decoding stopped at frame {index} ({_av_message(e)}); kept the frames before")
        if index < 0:
            raise VideoDecodeError("the video has no frames")
        report.num_frames = index + 1


def iter_video_frames(
    path: str | Path,
    fps: float | None = 1.0,
    backend: str = "auto",
    threads: int = 0,
    report: DecodeReport | None = None,
    sampling: str = "round",
    keep: set[int] | None = None,
) -> Iterator[DecodedFrame]:
    """Yield the sampled frames of ``path`` in order (``sampling``: see :func:`sampling_step`; ``keep``: only
    these frame indices, among the sampled ones: pass ``fps=None`` to choose from every frame).

    ``backend``: ``auto`` (decord, then PyAV where decord is missing or fails), ``decord`` or ``pyav``.
    Raises :class:`VideoDecodeError` when nothing can be decoded. Problems after some frames were decoded are
    appended to ``report.warnings`` and decoding continues with the other backend where possible.
    """
    path = Path(path)
    report = report if report is not None else DecodeReport()
    if backend not in ("auto", "decord", "pyav"):
        raise ValueError(f"backend must be 'auto', 'decord' or 'pyav', got {backend!r}")
    if path.stat().st_size == 0:
        raise VideoDecodeError("the file is empty (0 bytes)")
    use_decord = backend == "decord" or (backend == "auto" and decord_available())
    if backend == "decord" and not decord_available():
        raise VideoDecodeError(
            "backend=decord but decord is not installed (no wheel for this platform?); use backend=pyav or auto"
        )
    next_index = 0
    if use_decord:
        try:
            for frame in _iter_decord(path, fps, threads, report, 0, sampling, keep):
                next_index = frame.index + 1
                yield frame
            return
        except Exception as e:  # noqa: BLE001 - any decord failure: fall back to PyAV (or report)
            reason = str(e) if isinstance(e, VideoDecodeError) else f"{type(e).__name__}: {str(e).strip()[:200]}"
            if backend == "decord":
                raise VideoDecodeError(reason) from e
            if next_index:
                report.warnings.append(f"decord failed after frame {next_index - 1} ({reason}); continued with PyAV")
            decord_reason = reason
    else:
        decord_reason = None
    try:
        yield from _iter_pyav(path, fps, threads, report, next_index, sampling, keep)
    except VideoDecodeError as e:
        if next_index:  # decord got some frames: keep them
            report.warnings.append(f"PyAV could not continue ({e})")
            return
        msg = f"{e} (PyAV)" if decord_reason is None else f"{e} (PyAV); decord: {decord_reason}"
        raise VideoDecodeError(msg) from e


def resize_short_side(image: np.ndarray, short: int | None) -> Image.Image:
    """Downscale so the shorter side is ``short`` px (never upscale; None keeps the native size)."""
    img = Image.fromarray(image)
    w, h = img.size
    if short is None or short <= 0 or min(w, h) <= short:
        return img
    scale = short / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)

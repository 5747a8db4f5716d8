"""Decode sampled frames from videos (decord, PyAV fallback) as RGB uint8 arrays; resize frames for storage.

Two sampling rules (``sampling=``): ``surgenet``, the SurgeNet authors' extraction, keeps the frames whose index is
a multiple of ``int(video_fps / fps)`` (at 1 fps: every ``int(fps)``-th frame, 29 at 29.97 fps), so a rebuild picks
their frames; ``round``, the exact-time rule, keeps one frame every ``round(video_fps / fps) / video_fps`` seconds of
presentation time (30 frames at 29.97 fps: closer to one frame per second of video time). At a constant frame rate
that is every ``round(video_fps / fps)``-th frame; in a variable-frame-rate video (phones, some recorders) it is
chosen by timestamp, so a stretch at 50 fps does not get five times the frames of one at 10 fps. An explicit set of
frame indices (a frame list) replaces both. The frame index and its timestamp become the frame's stable key.

Frames come out as they are displayed, whichever backend decodes them: the container's rotation (display matrix:
phone and some robot recordings are stored sideways) is applied, and non-square pixels (sample aspect ratio, e.g.
PAL 720x576 at 64:45) are resampled to square ones by scaling the width (720x576 -> 1024x576), so a circle stays
round. decord 0.6 applies a 180-degree rotation itself but returns 90/270-degree frames with a broken memory layout
(and its batch read fails), so a rotated video is always decoded by PyAV.
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

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
    "select_by_time",
    "to_display",
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
    rotation: int = 0  # degrees counter-clockwise applied for display (container display matrix)
    pixel_aspect: float = 1.0  # sample aspect ratio (pixel width / height) corrected to square pixels
    by_time: bool = False  # frames were chosen by presentation time (the exact-time rule)
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


class _TimeGrid:
    """The exact-time rule: keep the frame on screen at each point of a grid of ``period`` seconds that starts at
    the first frame's timestamp, each frame at most once. A frame is on screen from its timestamp until the next
    one's, so deciding on a frame needs the next timestamp: :meth:`feed` answers for the frame before, :meth:`finish`
    for the last. A quarter of a nominal frame of tolerance absorbs the rounding of timestamps to the container's
    time base, so a constant-rate video gets exactly every ``step``-th frame."""

    def __init__(self, period: float, tolerance: float) -> None:
        self.period, self.tolerance = period, tolerance
        self.origin: float | None = None
        self.point = 0.0  # the next grid point to fill
        self.last = 0.0  # the timestamp of the frame waiting for a decision

    def feed(self, t: float) -> bool:
        """Take the next frame's timestamp; return whether the frame before it is kept (False for the first)."""
        if self.origin is None:
            self.origin = self.point = self.last = t
            return False
        kept = self.last <= self.point + self.tolerance < t
        if kept:  # skip the grid points the kept frame covers (a gap in a variable-rate video)
            self.point = self.origin + math.ceil((t - self.tolerance - self.origin) / self.period) * self.period
        self.last = t
        return kept

    def finish(self) -> bool:
        """Whether the last frame is kept: only where it lies on a grid point (its duration is unknown)."""
        return self.origin is not None and abs(self.last - self.point) <= self.tolerance


def _time_grid(video_fps: float, step: int) -> _TimeGrid:
    return _TimeGrid(step / video_fps, 0.25 / video_fps)


def select_by_time(timestamps: Iterable[float], video_fps: float, step: int) -> list[int]:
    """Indices of the frames the exact-time rule keeps: the frame on screen every ``step / video_fps`` seconds of
    presentation time (every ``step``-th frame at a constant rate)."""
    grid = _time_grid(video_fps, step)
    times = [float(t) for t in timestamps]
    kept = [i - 1 for i, t in enumerate(times) if grid.feed(t)]
    return kept + [len(times) - 1] if grid.finish() else kept


def _quarter_turns(degrees: float, report: DecodeReport) -> int:
    """Counter-clockwise quarter turns of a display rotation; other angles are reported and not applied."""
    turns = round(degrees / 90)
    if abs(degrees - 90 * turns) > 1:
        warning = f"rotation of {degrees:g} degrees is not a multiple of 90: frames kept as stored"
        if warning not in report.warnings:
            report.warnings.append(warning)
        return 0
    return turns % 4


def to_display(image: np.ndarray, quarter_turns: int = 0, pixel_aspect: float = 1.0) -> np.ndarray:
    """A stored frame as displayed: pixels made square (the width scaled by the sample aspect ratio), then
    rotated counter-clockwise by ``quarter_turns`` x 90 degrees."""
    h, w = image.shape[:2]
    width = max(1, round(w * pixel_aspect))
    if width != w:
        img = Image.fromarray(image).resize((width, h), Image.Resampling.BICUBIC)
        image = np.asarray(img)
    if quarter_turns % 4:
        image = np.rot90(image, quarter_turns % 4)
    return np.ascontiguousarray(image)


def _pixel_aspect(stream: Any) -> float:
    """The stream's sample aspect ratio (container first, then the bitstream, as FFmpeg guesses it); 1 if unset."""
    for owner in (stream, stream.codec_context):
        sar = getattr(owner, "sample_aspect_ratio", None)
        if sar and Fraction(sar) > 0:
            return float(Fraction(sar))
    return 1.0


def _probe_display(path: Path, report: DecodeReport) -> tuple[int, float]:
    """Rotation (quarter turns) and pixel aspect of ``path``, read with PyAV from its first frame; (0, 1) when
    PyAV cannot read it (decord may still)."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            aspect = _pixel_aspect(stream)
            first = next(container.decode(stream))
            return _quarter_turns(first.rotation, report), aspect
    except Exception as e:  # noqa: BLE001 - a probe failure is not a decode failure: decode as stored
        log.debug("%s: could not read its rotation/aspect with PyAV (%s)", path, _av_message(e))
        return 0, 1.0


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
    pixel_aspect: float = 1.0,
) -> Iterator[DecodedFrame]:
    """Sampled frames by decord (unrotated videos only: see the module docstring); ``pixel_aspect`` is probed by
    PyAV as decord does not expose it."""
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
    report.pixel_aspect = pixel_aspect
    report.by_time = rule == "round" and step > 1
    if report.by_time:
        sampled = select_by_time(vr.get_frame_timestamp(list(range(n)))[:, 0], report.video_fps, step)
    else:
        sampled = list(range(0, n, step))
    indices = [i for i in sampled if i >= start and (keep is None or i in keep)]
    for lo in range(0, len(indices), _CHUNK):
        chunk = indices[lo : lo + _CHUNK]
        batch = vr.get_batch(chunk).asnumpy()
        stamps = vr.get_frame_timestamp(chunk)[:, 0]
        for i, img, t in zip(chunk, batch, stamps, strict=True):
            yield DecodedFrame(int(i), round(float(t), 6), to_display(img, 0, pixel_aspect))


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
        report.pixel_aspect = _pixel_aspect(stream)
        report.by_time = rule == "round" and step > 1
        grid = _time_grid(report.video_fps, step) if report.by_time else None
        decoded = _DecodedStream(container.decode(stream), report.video_fps)
        for index, t, frame in _sampled(decoded, grid, step):
            if index < start or (keep is not None and index not in keep):
                continue
            turns = _quarter_turns(frame.rotation, report)  # the stream's display matrix, on every frame
            report.rotation = 90 * turns
            image = to_display(frame.to_ndarray(format="rgb24"), turns, report.pixel_aspect)
            yield DecodedFrame(index, round(t, 6), image)
        index = decoded.count - 1
        if decoded.error is not None:
            if index < 0:
                raise VideoDecodeError(f"no frame could be decoded: {_av_message(decoded.error)}") from decoded.error
            report.warnings.append(
                f"decoding stopped at frame {index} ({_av_message(decoded.error)}); kept the frames before"
            )
        if index < 0:
            raise VideoDecodeError("the video has no frames")
        report.num_frames = index + 1


class _DecodedStream:
    """PyAV's decoded frames as (index, timestamp, frame), ending quietly at a decoding error (kept in ``error``)
    so that the frames before it, and a frame held for a sampling decision, are not lost."""

    def __init__(self, frames: Iterator[Any], video_fps: float) -> None:
        self.frames, self.video_fps = frames, video_fps
        self.count = 0
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[tuple[int, float, Any]]:
        import av

        try:
            for frame in self.frames:
                index, self.count = self.count, self.count + 1
                t = float(frame.time) if frame.time is not None else index / (self.video_fps or 1.0)
                yield index, t, frame
        except (av.error.FFmpegError, ValueError, RuntimeError) as e:
            self.error = e


def _sampled(
    decoded: Iterable[tuple[int, float, Any]], grid: _TimeGrid | None, step: int
) -> Iterator[tuple[int, float, Any]]:
    """The frames a sampling rule keeps: every ``step``-th, or by ``grid`` (holding one frame until the next
    one's timestamp says whether it was on screen at a grid point)."""
    held: tuple[int, float, Any] | None = None
    for item in decoded:
        if grid is None:
            if item[0] % step == 0:
                yield item
            continue
        if grid.feed(item[1]) and held is not None:
            yield held
        held = item
    if grid is not None and held is not None and grid.finish():
        yield held


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

    ``backend``: ``auto`` (decord, then PyAV where decord is missing or fails), ``decord`` or ``pyav``; frames
    come out as displayed (rotation and pixel aspect applied) from either.
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
    pixel_aspect = 1.0
    if use_decord:
        turns, pixel_aspect = _probe_display(path, report)
        if turns:  # decord 0.6 garbles 90/270-degree frames and rotates 180 itself: PyAV gives them as displayed
            use_decord = False
            if backend == "decord":
                report.warnings.append(f"rotated by {90 * turns} degrees: decoded with PyAV (decord mis-decodes it)")
    next_index = 0
    if use_decord:
        try:
            for frame in _iter_decord(path, fps, threads, report, 0, sampling, keep, pixel_aspect):
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

"""Video decoding (decord and PyAV) over several containers/codecs, frame sampling, storage resizing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data.data_media import (
    VIDEO_KINDS,
    index_of,
    time_of,
    write_picture_video,
    write_vfr_video,
    write_video,
)
from surgenet_ssl.data.video import (
    DecodeReport,
    VideoDecodeError,
    iter_video_frames,
    resize_short_side,
    sampling_step,
    select_by_time,
)


def test_sampling_step_rules() -> None:
    # surgenet: the published extraction keeps frames whose index is a multiple of int(fps); round: of round(fps).
    assert sampling_step(25.0, 1, "surgenet") == sampling_step(25.0, 1) == 25
    assert sampling_step(29.97, 1, "surgenet") == 29 and sampling_step(29.97, 1, "round") == 30
    assert sampling_step(59.94, 2, "surgenet") == 29 and sampling_step(30.0, 1, "surgenet") == 30
    with pytest.raises(ValueError, match="sampling must be one of surgenet, round"):
        sampling_step(25.0, 1, "nearest")
    assert sampling_step(25.0, 5) == 5
    assert sampling_step(25.0, None) == 1
    assert sampling_step(10.0, 30) == 1  # never below 1: every frame
    assert sampling_step(float("nan"), 1) == 1


@pytest.mark.parametrize("backend", ["decord", "pyav"])
@pytest.mark.parametrize("kind", VIDEO_KINDS, ids=[k[0] for k in VIDEO_KINDS])
def test_decoded_frames_are_the_sampled_indices(tmp_path: Path, kind: tuple, backend: str) -> None:
    name, codec, pix_fmt, w, h = kind
    path = write_video(tmp_path / name, codec, pix_fmt, w, h, frames=50, fps=25)
    report = DecodeReport()
    frames = list(iter_video_frames(path, fps=5, backend=backend, report=report))
    assert [f.index for f in frames] == list(range(0, 50, 5))
    assert report.backend == backend and report.step == 5
    for f in frames:
        assert f.image.shape == (h, w, 3) and f.image.dtype == np.uint8
        assert index_of(f.image) == f.index  # the pixels really are frame f.index
        assert f.timestamp == pytest.approx(f.index / 25.0, abs=0.021)


def test_corrupt_and_empty_videos_raise_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoDecodeError, match="empty"):
        list(iter_video_frames(empty))
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(VideoDecodeError, match="cannot open"):
        list(iter_video_frames(junk))
    good = write_video(tmp_path / "good.mp4", frames=30)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 3])  # mp4 index (moov) is at the end: unreadable
    with pytest.raises(VideoDecodeError):
        list(iter_video_frames(cut, backend="auto"))


def test_truncated_stream_keeps_decodable_frames(tmp_path: Path) -> None:
    good = write_video(tmp_path / "good.avi", "mjpeg", "yuvj420p", 64, 48, frames=40)
    cut = tmp_path / "cut.avi"
    cut.write_bytes(good.read_bytes()[: int(good.stat().st_size * 0.6)])
    frames = list(iter_video_frames(cut, fps=None, backend="auto"))
    assert 5 < len(frames) < 40
    assert [f.index for f in frames] == list(range(len(frames)))
    assert all(index_of(f.image) == f.index for f in frames[:-1])  # the last one may be cut in the middle


def test_resize_short_side_downscales_only() -> None:
    big = np.zeros((1080, 1920, 3), np.uint8)
    assert resize_short_side(big, 320).size == (569, 320)
    small = np.zeros((240, 320, 3), np.uint8)
    assert resize_short_side(small, 320).size == (320, 240)  # never upscaled
    assert resize_short_side(big, None).size == (1920, 1080)


def test_auto_falls_back_to_pyav_without_decord(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import surgenet_ssl.data.video as V

    path = write_video(tmp_path / "a.mp4", frames=50, fps=25)
    monkeypatch.setattr(V, "decord_available", lambda: False)  # e.g. aarch64: no decord wheel
    report = DecodeReport()
    assert [f.index for f in iter_video_frames(path, fps=5, report=report)] == list(range(0, 50, 5))
    assert report.backend == "pyav"
    with pytest.raises(VideoDecodeError, match="decord is not installed"):
        list(iter_video_frames(path, backend="decord"))


def test_decord_failing_mid_video_continues_with_pyav(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import surgenet_ssl.data.video as V

    path = write_video(tmp_path / "a.mp4", frames=50, fps=25)
    real = V._iter_decord

    def flaky(*args, **kwargs):
        for n, frame in enumerate(real(*args, **kwargs)):
            if n == 3:
                raise RuntimeError("simulated decord error")
            yield frame

    monkeypatch.setattr(V, "_iter_decord", flaky)
    report = DecodeReport()
    frames = list(iter_video_frames(path, fps=5, report=report))
    assert [f.index for f in frames] == list(range(0, 50, 5))  # nothing lost, nothing twice
    assert all(index_of(f.image) == f.index for f in frames)
    assert report.backend == "pyav" and "decord failed after frame 10" in report.warnings[0]


def _corner_picture(h: int = 48, w: int = 64) -> np.ndarray:
    picture = np.zeros((h, w, 3), np.uint8)
    picture[: h // 2, : w // 2] = 255  # a bright top-left quadrant: shows any rotation or flip
    return picture


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_rotated_videos_come_out_upright_from_both_backends(tmp_path: Path, rotation: int) -> None:
    # a phone / robot recording stored sideways with a display matrix: decord 0.6 garbles 90-degree frames and PyAV
    # returned them as stored; both must give the picture as displayed (counter-clockwise rotation)
    picture = _corner_picture()
    path = write_picture_video(tmp_path / "rotated.mp4", picture, rotation=rotation)
    expected = np.rot90(picture, rotation // 90).astype(float)
    decoded = {}
    for backend in ("decord", "pyav"):
        report = DecodeReport()
        frames = list(iter_video_frames(path, fps=5, backend=backend, report=report))
        assert len(frames) == 2 and report.rotation == rotation % 360
        for f in frames:
            assert f.image.shape == expected.shape, backend
            assert np.abs(f.image.astype(float) - expected).mean() < 8, backend
        decoded[backend] = frames[0].image
    assert np.abs(decoded["decord"].astype(float) - decoded["pyav"].astype(float)).max() < 2
    # not rotated: decord decodes it itself, unchanged
    report = DecodeReport()
    plain = list(iter_video_frames(write_picture_video(tmp_path / "plain.mp4", picture), 5, "decord", report=report))
    assert report.backend == "decord" and report.rotation == 0 and plain[0].image.shape == picture.shape


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_non_square_pixels_are_made_square(tmp_path: Path, backend: str) -> None:
    # a PAL-like recorder: pixels 64:45 wide; a disc on screen is stored as an ellipse 45/64 as wide as tall
    sar = (64, 45)
    h, w = 72, 90
    yy, xx = np.mgrid[0:h, 0:w]
    radius = 30
    stored = ((xx - w / 2) * 64 / 45) ** 2 + (yy - h / 2) ** 2 <= radius**2
    picture = np.repeat(np.where(stored, 230, 20).astype(np.uint8)[..., None], 3, axis=2)
    path = write_picture_video(tmp_path / "pal.mp4", picture, pixel_aspect=sar)
    report = DecodeReport()
    frame = next(iter(iter_video_frames(path, fps=5, backend=backend, report=report)))
    assert report.backend == backend and report.pixel_aspect == pytest.approx(64 / 45)
    assert frame.image.shape == (h, round(w * 64 / 45), 3)  # the width scaled, as players display it
    disc = frame.image[..., 0] > 125
    width, height = disc.any(axis=0).sum(), disc.any(axis=1).sum()
    assert width == pytest.approx(height, abs=2) and height == pytest.approx(2 * radius, abs=2)  # round again


@pytest.mark.parametrize("container", ["mp4", "mkv"])
@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_exact_time_rule_samples_variable_frame_rate_by_timestamp(tmp_path: Path, backend: str, container: str) -> None:
    # 4 s at 50 fps then 4 s at 10 fps: one frame per second of presentation time, not per N frames (which gave 7
    # frames from the first half and 1 from the second)
    times = write_vfr_video(tmp_path / f"vfr.{container}", [(4, 50), (4, 10)])
    report = DecodeReport()
    frames = list(iter_video_frames(tmp_path / f"vfr.{container}", fps=1, backend=backend, report=report))
    assert report.backend == backend and report.by_time
    assert [f.timestamp for f in frames] == pytest.approx([0, 1, 2, 3, 4, 5, 6, 7], abs=0.03)
    for f in frames:
        assert times[f.index] == pytest.approx(f.timestamp, abs=1e-3)  # the index is the frame shown at that time
        assert time_of(f.image) == pytest.approx(f.timestamp, abs=0.2)  # and so are the pixels


def test_select_by_time_is_every_step_th_frame_at_a_constant_rate() -> None:
    # the exact-time rule keeps the old round rule's frames at a constant rate, timestamps rounded to ms or not
    for fps in (25.0, 30000 / 1001, 50.0, 60000 / 1001):
        step = sampling_step(fps, 1, "round")
        exact = [i / fps for i in range(3000)]
        assert select_by_time(exact, fps, step) == list(range(0, 3000, step))
        assert select_by_time([round(t, 3) for t in exact], fps, step) == list(range(0, 3000, step))
    # a stream starting late (edit list / B-frames) counts from its first frame
    assert select_by_time([0.5 + i / 10 for i in range(25)], 10.0, 10) == [0, 10, 20]
    # the frame on screen at each second, once: frame 1 shows from 0.1 s to 5 s (one frame for four grid points);
    # the last frame only where it lies on a grid point
    assert select_by_time([0.0, 0.1, 5.0, 5.1, 6.0], 10.0, 10) == [0, 1, 2, 4]
    assert select_by_time([0.0, 0.1, 5.0, 5.1, 5.9], 10.0, 10) == [0, 1, 2]
    assert select_by_time([], 10.0, 10) == []

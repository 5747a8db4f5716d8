"""Video decoding (decord and PyAV) over several containers/codecs, frame sampling, storage resizing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data.data_media import VIDEO_KINDS, index_of, write_video
from surgenet_ssl.data.video import (
    DecodeReport,
    VideoDecodeError,
    iter_video_frames,
    resize_short_side,
    sampling_step,
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

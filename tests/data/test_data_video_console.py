"""A corrupt video costs one warning with the reason, not decord's C++ error line on the console."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from surgenet_ssl.data import video as V
from surgenet_ssl.data.video import VideoDecodeError, iter_video_frames


# find_spec, not an import: decord's bundled FFmpeg, once loaded, breaks PyAV's VP9 encoder that other tests use
@pytest.mark.skipif(importlib.util.find_spec("decord") is None, reason="decord has no wheel for this platform")
@pytest.mark.parametrize("backend", ["decord", "auto"])
def test_decord_open_error_stays_off_the_console(tmp_path: Path, capfd, backend: str) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).bytes(4000))
    capfd.readouterr()
    with pytest.raises(VideoDecodeError, match=r"cannot open it \(Invalid data found when processing input\)"):
        list(iter_video_frames(junk, backend=backend))
    out, err = capfd.readouterr()
    assert "video_reader.cc" not in err + out and "ERROR opening" not in err + out


def test_native_stderr_capture_restores_fd2(capfd) -> None:
    with V._native_stderr_captured() as lines:
        os.write(2, b"[12:00:00] /src/video/video_reader.cc:83: ERROR opening: /x/y.mp4, Invalid data\n")
    os.write(2, b"after\n")
    assert V._native_reason(lines, Path("/x/y.mp4")) == "Invalid data"
    assert capfd.readouterr().err == "after\n"

"""``scripts/bench_augment.py --frames DIR`` finds frames in DIR and in class sub-folders (ImageFolder layout)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_augment.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_augment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_frames_in_class_subfolders_are_found_round_robin(bench, tmp_path):
    for cls, n in (("a", 3), ("b", 2), ("c/deeper", 1)):
        (tmp_path / cls).mkdir(parents=True)
        for i in range(n):
            (tmp_path / cls / f"{i}.JPG").write_bytes(f"{cls}{i}".encode())
    (tmp_path / "a" / "notes.txt").write_text("not a frame")
    names = [p.relative_to(tmp_path).as_posix() for p in bench.find_frames(tmp_path, limit=4)]
    assert names == ["a/0.JPG", "b/0.JPG", "c/deeper/0.JPG", "a/1.JPG"]  # every class in a small sample
    assert bench.load_frames(tmp_path, limit=100) == [b"a0", b"b0", b"c/deeper0", b"a1", b"b1", b"a2"]


def test_flat_folder_still_works_and_empty_folder_is_a_clear_error(bench, tmp_path):
    (tmp_path / "x.png").write_bytes(b"x")
    assert bench.load_frames(tmp_path, limit=10) == [b"x"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no .jpg/.jpeg/.png frames"):
        bench.load_frames(tmp_path / "empty", limit=10)

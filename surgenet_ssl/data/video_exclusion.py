"""Leakage guard: videos kept out of pretraining (``exclude_videos=`` in prepare and in a dataset mixture).

A backbone evaluated on a downstream set must not have seen that set's validation/test videos during
pretraining. Cholec80 is both a pretraining source and the base of common downstream sets, so the standard lists
ship with the package (``surgenet_ssl/data/video_lists/*.txt``, each with its source): ``cholec80_test`` (41-80),
``cholec80_val`` (33-40 of the 32/8/40 split) and ``cholecseg8k`` (the 17 Cholec80 videos CholecSeg8k comes from).

``exclude_videos`` takes a list (or one item); each item is a shipped list's name, a text file (one video id a
line, ``#`` comments) or a video id. An id matches a prepared video whose id is the same or ends with ``/<id>``
(``video41`` matches ``videos/video41`` and ``cholec80/videos/video41``).

``exclude_frames`` (curation, :mod:`surgenet_ssl.data.curation`) is the same for single frames: a patient who opted
out of part of a recording, a frame that shows a face. Items are text files (one frame key a line) or keys; a key
``<video>/<frame>`` matches a prepared frame whose key is it or ends with ``/<key>``, and a numeric frame part
matches the prepared frame index whatever its zero padding (``video41/25`` matches ``videos/video41/00000025``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgenet_ssl.data.shards import sanitize_id

__all__ = [
    "LISTS_DIR",
    "FrameExclusion",
    "VideoExclusion",
    "load_frame_exclusion",
    "load_video_exclusion",
    "shipped_lists",
]

LISTS_DIR = Path(__file__).resolve().parent / "video_lists"


def shipped_lists() -> dict[str, Path]:
    """The lists shipped with the package, by name (file name without ``.txt``)."""
    return {p.stem: p for p in sorted(LISTS_DIR.glob("*.txt"))}


@dataclass(frozen=True)
class VideoExclusion:
    """Video ids to leave out and where they were listed (for the logs, the manifest and the model card)."""

    ids: frozenset[str] = frozenset()
    origins: tuple[str, ...] = ()  # shipped list names, file paths, and "ids given inline"

    def __bool__(self) -> bool:
        return bool(self.ids)

    def match(self, video: str) -> str | None:
        """The listed id that ``video`` (a prepared video id) matches, or None."""
        return _listed_tail(video, self.ids, min_parts=1)

    def describe(self) -> str:
        return f"{len(self.ids)} video ids from {', '.join(self.origins)}"

    def to_dict(self) -> dict[str, Any]:
        return {"origins": list(self.origins), "ids": sorted(self.ids)}


def _setting_items(value: Any) -> Iterator[tuple[str, Path]]:
    """The non-empty items of an exclusion setting (one item or a list), each with the path it would name."""
    items: Iterable[Any] = [value] if isinstance(value, (str, Path)) else value
    for raw in items:
        item = str(raw).strip()
        if item:
            yield item, Path(item).expanduser()


def _listed_tail(name: str, listed: set[str] | frozenset[str], min_parts: int) -> str | None:
    """The longest tail of ``name`` (whole ``/`` components, at least ``min_parts``) that is ``listed``, or None: a
    listed id matches a prepared id that ends with it (``cholec80/video01`` matches ``video01``)."""
    parts = name.split("/")
    for i in range(len(parts) - min_parts + 1):
        tail = "/".join(parts[i:])
        if tail in listed:
            return tail
    return None


def _read_ids(path: Path, setting: str = "exclude_videos") -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{setting}: cannot read {path} ({e})") from e
    ids = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return [i for i in ids if i]


def load_video_exclusion(value: Any, setting: str = "exclude_videos") -> VideoExclusion:
    """Parse an ``exclude_videos`` setting (None, one item or a list of items) into a :class:`VideoExclusion`
    (also the video selections of downstream splits: ``setting`` names the option in errors).

    A missing file (an item with ``/`` or ending ``.txt``/``.csv`` that does not exist) is an error naming it, so
    a typo never turns into an id that matches nothing."""
    if value is None or value == "":
        return VideoExclusion()
    shipped = shipped_lists()
    ids: set[str] = set()
    origins: list[str] = []
    inline: list[str] = []
    for item, path in _setting_items(value):
        if item in shipped:
            ids.update(_read_ids(shipped[item]))
            origins.append(item)
        elif path.is_file():
            ids.update(_read_ids(path))
            origins.append(str(path))
        elif "/" in item or item.lower().endswith((".txt", ".csv")):
            raise ValueError(
                f"{setting}: {item} is not a file (nor one of the shipped lists: {', '.join(shipped)}). Give a "
                "text file with one video id a line, a shipped list's name, or video ids."
            )
        else:
            inline.append(item)
    ids.update(inline)
    if inline:
        origins.append(f"{len(inline)} ids given inline")
    return VideoExclusion(frozenset(sanitize_id(i) for i in ids), tuple(origins))


def _canonical_frame(key: str) -> str:
    """A frame key with a numeric last part written as prepare writes frame indices (8 digits)."""
    head, _, last = key.rpartition("/")
    if last.isdigit():
        last = f"{int(last):08d}"
    return f"{head}/{last}" if head else last


@dataclass(frozen=True)
class FrameExclusion:
    """Frame keys to leave out (opt-outs of single frames) and the files or settings they came from."""

    keys: frozenset[str] = frozenset()
    origins: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.keys)

    def match(self, key: str) -> str | None:
        """The listed key that the prepared frame ``key`` (``<video>/<frame>``) matches, or None."""
        return _listed_tail(_canonical_frame(key), self.keys, min_parts=2)  # a listed key: <video>/<frame> at least

    def describe(self) -> str:
        return f"{len(self.keys)} frame keys from {', '.join(self.origins)}"

    def to_dict(self) -> dict[str, Any]:
        return {"origins": list(self.origins), "keys": len(self.keys)}


def load_frame_exclusion(value: Any) -> FrameExclusion:
    """Parse an ``exclude_frames`` setting (None, one item or a list: text files of frame keys, or keys). A missing
    file is an error naming it; a key without a ``/`` (no video part) is refused, as it would match any video."""
    if value is None or value == "":
        return FrameExclusion()
    keys: set[str] = set()
    origins: list[str] = []
    inline: list[str] = []
    for item, path in _setting_items(value):
        if path.is_file():
            keys.update(_read_ids(path, "exclude_frames"))
            origins.append(str(path))
        elif item.lower().endswith((".txt", ".csv")) or path.is_absolute():
            raise ValueError(f"exclude_frames: {item} is not a file. Give text files of frame keys or frame keys.")
        else:
            inline.append(item)
    keys.update(inline)
    if inline:
        origins.append(f"{len(inline)} keys given inline")
    canonical = {_canonical_frame(sanitize_id(k)) for k in keys}
    bad = sorted(k for k in canonical if "/" not in k)
    if bad:
        raise ValueError(
            f"exclude_frames: {bad[:5]} name no video: give frame keys as <video>/<frame> (as in the shards, e.g. "
            "videos/video41/00000025, or video41/25)"
        )
    return FrameExclusion(frozenset(canonical), tuple(origins))

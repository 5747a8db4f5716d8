"""Leakage guard: videos kept out of pretraining (``exclude_videos=`` in prepare and in a dataset mixture).

A backbone evaluated on a downstream set must not have seen that set's validation/test videos during
pretraining. Cholec80 is both a pretraining source and the base of common downstream sets, so the standard lists
ship with the package (``surgenet_ssl/data/video_lists/*.txt``, each with its source): ``cholec80_test`` (41-80),
``cholec80_val`` (33-40 of the 32/8/40 split) and ``cholecseg8k`` (the 17 Cholec80 videos CholecSeg8k comes from).

``exclude_videos`` takes a list (or one item); each item is a shipped list's name, a text file (one video id a
line, ``#`` comments) or a video id. An id matches a prepared video whose id is the same or ends with ``/<id>``
(``video41`` matches ``videos/video41`` and ``cholec80/videos/video41``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgenet_ssl.data.shards import sanitize_id

__all__ = ["LISTS_DIR", "VideoExclusion", "shipped_lists", "load_video_exclusion"]

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
        if video in self.ids:
            return video
        parts = video.split("/")
        for i in range(1, len(parts)):
            tail = "/".join(parts[i:])
            if tail in self.ids:
                return tail
        return None

    def describe(self) -> str:
        return f"{len(self.ids)} video ids from {', '.join(self.origins)}"

    def to_dict(self) -> dict[str, Any]:
        return {"origins": list(self.origins), "ids": sorted(self.ids)}


def _read_ids(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"exclude_videos: cannot read {path} ({e})") from e
    ids = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return [i for i in ids if i]


def load_video_exclusion(value: Any, setting: str = "exclude_videos") -> VideoExclusion:
    """Parse an ``exclude_videos`` setting (None, one item or a list of items) into a :class:`VideoExclusion`
    (also the video selections of downstream splits: ``setting`` names the option in errors).

    A missing file (an item with ``/`` or ending ``.txt``/``.csv`` that does not exist) is an error naming it, so
    a typo never turns into an id that matches nothing."""
    if value is None or value == "":
        return VideoExclusion()
    items: Iterable[Any] = [value] if isinstance(value, (str, Path)) else value
    shipped = shipped_lists()
    ids: set[str] = set()
    origins: list[str] = []
    inline: list[str] = []
    for raw in items:
        item = str(raw).strip()
        if not item:
            continue
        path = Path(item).expanduser()
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

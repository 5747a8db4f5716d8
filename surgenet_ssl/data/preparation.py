"""Turn a folder of videos and/or frame folders into WebDataset shards + manifest.json (one source).

Work unit = one video file, or one folder of images (frames of one video, or one category of images). Units are
processed in parallel worker processes; each unit writes its own shards (renamed when complete) and then a
completion record in ``.state/``. The manifest is rebuilt from those records, so:

- a killed run never lists a partial shard (shards of unfinished units have no record, temporary files are
  swept on the next run);
- a rerun skips every unit with a record whose shards are still on disk, without rewriting them;
- corrupt/empty videos and corrupt images are skipped with a warning naming the file, and counted in the
  summary and in the manifest (``skipped``).

Frames are stored downscaled to ``resize_short`` (default 320 px on the shorter side) as JPEG; see
surgenet_ssl/configs/prepare.yaml for why.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import datetime as _dt
import errno
import fnmatch
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import re
import signal
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

from surgenet_ssl.data import shards as S
from surgenet_ssl.data.decode import load_rgb_image
from surgenet_ssl.data.inputs import InputError, Member, container_stem, list_members, local_copy, read_member
from surgenet_ssl.data.shard_index import index_path
from surgenet_ssl.data.video import (
    IMAGE_EXTENSIONS,
    SAMPLING_RULES,
    VIDEO_EXTENSIONS,
    DecodeReport,
    VideoDecodeError,
    iter_video_frames,
    resize_short_side,
)
from surgenet_ssl.data.video_exclusion import VideoExclusion

__all__ = [
    "PrepareSettings",
    "Unit",
    "PrepareSummary",
    "PrepareError",
    "discover_units",
    "process_unit",
    "prepare_source",
]

log = logging.getLogger(__name__)
STATE_DIR = ".state"
SETTINGS_FILE = "settings.json"
# Settings that change the frames on disk: a rerun with other values would mix two datasets in one directory.
IMAGES_PER_UNIT = 5000  # a bigger image folder is split into parts prepared in parallel (keys do not change)
_CONTENT_SETTINGS = (
    "source",
    "fps",
    "sampling",
    "frame_list_sha256",
    "resize_short",
    "jpeg_quality",
    "shard_max_frames",
    "image_stride",
)
# What outputs prepared before a setting existed were made with (the rule the code had then).
_SETTING_BEFORE = {"sampling": "round", "frame_list_sha256": None}
EXCLUDED = "(excluded by include/exclude)"  # the ignored-files count of files a Selection left out


# Errors of the *output* side: stop the run instead of skipping every remaining input.
_FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


class PrepareError(RuntimeError):
    """Bad prepare input or settings (message says what and how to fix)."""


@dataclass(frozen=True)
class PrepareSettings:
    source: str
    procedure: str = "unknown"
    fps: float | None = 1.0  # frames per second sampled from videos (None/0: every frame)
    resize_short: int | None = 320  # shorter side in px after resize (None: native)
    jpeg_quality: int = 90
    shard_max_frames: int = 1000
    image_stride: int = 1  # keep every n-th image of an image folder (natural name order)
    backend: str = "auto"  # video decoder: auto | decord | pyav
    sampling: str = "round"  # video frame rule: "surgenet" (every int(fps)-th, the authors') | "round" (see video.py)
    frame_list: str | None = None  # a file listing the frames to keep (replaces fps sampling and image_stride)
    frame_list_sha256: str | None = None  # its content (set by prepare_source): a changed list is other frames

    def content(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _CONTENT_SETTINGS}


@dataclass
class Unit:
    """One video file, or one folder of images, with its stable id (the key prefix of its frames)."""

    id: str  # work id: names its shards and its completion record
    kind: str  # "video" | "images"
    input: str  # path relative to the input root (posix); "." for the root folder itself
    files: list[str] = field(default_factory=list)  # image files relative to the input root (kind=images)
    size: int = 0  # bytes of the input (videos) or number of images
    video: str = ""  # key prefix and metadata "video" of its frames (= id, except for parts of big folders)
    keys: list[str] = field(default_factory=list)  # per image file: its key suffix (stable, from the file name)
    offset: int = 0  # position of files[0] in its folder (natural name order)
    root: str = ""  # the input location it comes from (absolute): a source may be fed from several
    members: list[Member] = field(default_factory=list)  # where to read its video / its images (files order)
    indices: list[int] | None = None  # frame_list: the frames to keep (video frame indices / image positions)

    def __post_init__(self) -> None:
        self.video = self.video or self.id


@dataclass
class PrepareSummary:
    source: str
    output: str
    units_total: int = 0
    units_done_before: int = 0  # finished by an earlier run (skipped now, not rewritten)
    units_done_now: int = 0
    units_failed: list[dict[str, str]] = field(default_factory=list)
    frames_total: int = 0  # in the manifest
    frames_written_now: int = 0
    shards_total: int = 0
    images_corrupt: int = 0  # corrupt images skipped (this run)
    videos_with_warnings: int = 0  # decoded with problems, e.g. only partly (this run; see warnings)
    units_damaged: list[str] = field(default_factory=list)  # finished inputs whose shards failed the check: redone
    units_kept: int = 0  # finished inputs of earlier runs from other input locations, kept in the manifest
    frames_kept: int = 0
    files_ignored: dict[str, int] = field(default_factory=dict)  # extension -> count of non-video/image files
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def frames_per_second(self) -> float:
        return self.frames_written_now / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        out = [
            f"source {self.source} -> {self.output}",
            f"  inputs: {self.units_total} ({self.units_done_before} already done, {self.units_done_now} done now, "
            f"{len(self.units_failed)} skipped as unreadable)",
            *(
                [f"  kept from earlier runs with other inputs: {self.units_kept} inputs, {self.frames_kept} frames"]
                if self.units_kept
                else []
            ),
            f"  frames: {self.frames_total} in {self.shards_total} shards ({self.frames_written_now} written now, "
            f"{self.frames_per_second:.1f} frames/s)",
        ]
        if self.units_damaged:
            out.append(f"  prepared again as their shards were damaged or missing: {len(self.units_damaged)} inputs")
        if self.images_corrupt:
            out.append(f"  corrupt images skipped: {self.images_corrupt}")
        if self.videos_with_warnings:
            out.append(f"  videos with decode warnings (e.g. decoded only partly): {self.videos_with_warnings}")
        for f in self.units_failed:
            out.append(f"  SKIPPED {f['input']}: {f['reason']}")
        if self.files_ignored:
            ignored = ", ".join(f"{ext or '(no ext)'}: {n}" for ext, n in sorted(self.files_ignored.items()))
            out.append(f"  ignored files (not video/image): {ignored}")
        return out


# ------------------------------------------------------------------------------------------------------ discovery
def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _dedupe(ids: dict[str, list[str]]) -> dict[str, str]:
    """{candidate id: [inputs]} -> {input: unique id}; colliding inputs all get a hash of their path appended."""
    out: dict[str, str] = {}
    for cand, inputs in ids.items():
        if len(inputs) == 1:
            out[inputs[0]] = cand
        else:
            for inp in inputs:
                out[inp] = f"{cand}-{hashlib.sha1(inp.encode()).hexdigest()[:8]}"
    return out


@dataclass(frozen=True)
class Selection:
    """Which files of an input are frames, and how frames name their video (registry presets set these).

    A pattern without ``/`` matches any path component (``HD`` drops every folder named HD, ``mask*.png`` every
    mask file); a pattern with ``/`` matches the whole relative path (``*`` crosses folders). A file is kept when
    it matches an ``include`` pattern (or there is none) and no ``exclude`` pattern. Patterns also match the
    input's own name: ``input=.../keyframes`` is what PSI-AVA's ``keyframes`` keeps, ``input=annots.zip`` what
    GLENDA's ``annots`` leaves out.
    ``video_pattern``: a regex on image file names (without extension) whose group ``video`` names the video
    (Surgical YouTube: ``<video>_frame_<n>_Sample<i>``), so frames of one video in several folders are one video.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    video_pattern: str | None = None

    def __str__(self) -> str:
        parts = [
            f"include={list(self.include)}" if self.include else "",
            f"exclude={list(self.exclude)}" if self.exclude else "",
            f"video_pattern={self.video_pattern!r}" if self.video_pattern else "",
        ]
        return " ".join(p for p in parts if p) or "every video and image"

    def keeps(self, rel: str, root_name: str = "") -> bool:
        named = f"{root_name}/{rel}" if root_name else rel
        return (not self.include or any(_matches(p, named) or _matches(p, rel) for p in self.include)) and not any(
            _matches(p, named) or _matches(p, rel) for p in self.exclude
        )


def _matches(pattern: str, rel: str) -> bool:
    if "/" in pattern:
        return fnmatch.fnmatchcase(rel, pattern.strip("/"))
    return any(fnmatch.fnmatchcase(part, pattern) for part in rel.split("/"))


def discover_units(
    input_path: str | Path,
    exclude: Iterable[str | Path] = (),
    ignored: Counter[str] | None = None,
    select: Selection | None = None,
) -> list[Unit]:
    """Find videos (one unit each) and image folders (one unit per folder, or per video named in the file names)
    under ``input_path`` (a folder, a zip/tar archive, a parquet table or one video), sorted by id.

    Hidden files/folders and ``exclude`` (e.g. the output directory inside the input) are skipped; other files
    are counted in ``ignored`` by extension, files left out by ``select`` under ``"(excluded by include/exclude)"``.
    Ids come from relative paths, so they do not depend on listing order.
    """
    root = Path(input_path)
    select = select or Selection()
    if not root.exists():
        raise PrepareError(f"input={root} does not exist. Give the folder with the source's videos or frames.")
    ignored = ignored if ignored is not None else Counter()
    try:
        members = list_members(root, {Path(p).resolve() for p in exclude}, ignored)
        pattern = re.compile(select.video_pattern) if select.video_pattern else None
    except (InputError, re.error) as e:
        raise PrepareError(str(e)) from e
    if pattern is not None and "video" not in pattern.groupindex:
        raise PrepareError(f"video_pattern={select.video_pattern!r} needs a named group (?P<video>...)")
    root_name = container_stem(root) if root.is_file() else root.resolve().name
    kept = [m for m in members if select.keeps(m.rel, root_name)]
    if len(kept) < len(members):
        ignored[EXCLUDED] += len(members) - len(kept)
    videos: dict[str, list[str]] = {}
    groups: dict[str, list[Member]] = {}  # image folder (or video named in the file names) -> its images
    by_rel: dict[str, Member] = {}
    for m in kept:
        by_rel[m.rel] = m
        if m.media == "video":
            videos.setdefault(S.sanitize_id(m.rel.rsplit(".", 1)[0]), []).append(m.rel)
            continue
        rel_dir, _, name = m.rel.rpartition("/")
        hit = pattern.fullmatch(name.rsplit(".", 1)[0]) if pattern else None
        group = f"\0{hit.group('video')}" if hit else rel_dir or "."
        groups.setdefault(group, []).append(m)
    folder_ids: dict[str, list[str]] = {}
    for group in groups:
        cand = group[1:] if group.startswith("\0") else group if group != "." else "frames"
        folder_ids.setdefault(S.sanitize_id(cand), []).append(group)
    # Videos and image folders share one id space (``a.mp4`` and folder ``a/`` would collide).
    merged: dict[str, list[str]] = {}
    for cand, inputs in list(videos.items()) + list(folder_ids.items()):
        merged.setdefault(cand, []).extend(inputs)
    unique = _dedupe(merged)
    where = str(root.resolve())
    units = [
        Unit(unique[rel], "video", rel, size=by_rel[rel].size, members=[by_rel[rel]], root=where)
        for inputs in videos.values()
        for rel in inputs
    ]
    for group, items in groups.items():
        named = group.startswith("\0")
        video_name = group[1:] if named else ""
        items = sorted(items, key=lambda m: _natural_key(m.rel.rpartition("/")[2] if named else m.rel))
        files = [m.rel for m in items]
        keys = _image_keys(files, strip=video_name)
        vid = unique[group]
        label = f"{video_name} (named in the file names)" if named else group
        for part, lo in enumerate(range(0, len(files), IMAGES_PER_UNIT)):  # big folders: parallel parts
            chunk = items[lo : lo + IMAGES_PER_UNIT]
            whole = len(files) <= IMAGES_PER_UNIT
            units.append(
                Unit(
                    vid if whole else f"{vid}@part{part:04d}",
                    "images",
                    label,
                    files=[m.rel for m in chunk],
                    size=len(chunk),
                    video=vid,
                    keys=[keys[m.rel] for m in chunk],
                    offset=lo,
                    members=chunk,
                    root=where,
                )
            )
    return sorted(units, key=lambda u: u.id)


def _image_keys(files: list[str], strip: str = "") -> dict[str, str]:
    """Stable per-image key suffixes from file stems (``img.001.png`` -> ``img_001``), deduplicated; ``strip``: the
    video name at the start of the stem, already in the key's video part (``v1_frame_3`` -> ``frame_3``)."""
    cands: dict[str, list[str]] = {}
    for f in files:
        stem = Path(f).stem
        if strip and stem.startswith(strip) and len(stem) > len(strip):
            stem = stem[len(strip) :].lstrip("_-. ") or stem
        cands.setdefault(S.sanitize_id(stem).replace("/", "_"), []).append(f)
    return _dedupe(cands)


# ----------------------------------------------------------------------------------------------------- one unit
def _jpeg(img: Any, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def process_unit(
    unit: Unit, input_root: str, output: str, settings: PrepareSettings, threads: int = 0
) -> dict[str, Any]:
    """Decode, resize, encode and shard one unit; write its completion record; return the record.

    Runs in a worker process. A unit that yields no frame is recorded as failed (``status: failed``) with the
    reason, and its shards are removed, so a rerun retries it.
    """
    out = Path(output)
    t0 = time.time()
    if os.environ.get("SURGENET_SSL_FAULT_CRASH_ON") == unit.input:  # fault injection for tests: a decoder segfault
        os.kill(os.getpid(), signal.SIGKILL)
    flat = S.flat_name(unit.id)
    writer = S.ShardWriter(out, f"shards/{flat}", unit.video, settings.shard_max_frames)
    record: dict[str, Any] = {
        "id": unit.id,
        "kind": unit.kind,
        "input": unit.input,
        "root": unit.root,
        "input_size": unit.size,
        "settings": settings.content(),
        "status": "ok",
        "frames": 0,
        "shards": [],
        "warnings": [],
        "corrupt_images": [],
    }
    frames = 0
    sizes: Counter[str] = Counter()  # "WxH" -> frames written at that size (GPU mode sizes its canvas from them)
    try:
        if unit.kind == "video":
            report = DecodeReport()
            with local_copy(unit.members[0], out) as path:
                frames = _write_video_frames(unit, path, settings, threads, report, writer, sizes)
            record.update(
                backend=report.backend, video_fps=report.video_fps, video_frames=report.num_frames, step=report.step
            )
            if report.rotation or report.pixel_aspect != 1.0:  # what was done to show the frames as displayed
                record.update(rotation=report.rotation, pixel_aspect=round(report.pixel_aspect, 6))
            record["warnings"] += [f"{unit.input}: {w}" for w in report.warnings]
            if unit.indices is not None and frames < len(unit.indices):
                record["warnings"].append(
                    f"{unit.input}: {len(unit.indices) - frames} frames of frame_list are past its end "
                    f"({report.num_frames} frames)"
                )
        else:
            frames = _write_images(unit, settings, writer, record, sizes)
        if frames == 0:
            raise VideoDecodeError("no frames decoded")
        record["shards"] = [s.to_dict() for s in writer.close()]
        record["frames"] = frames
        record["frame_sizes"] = dict(sorted(sizes.items()))
    except BaseException as e:
        writer.abort()  # no shard of a failed unit stays behind (nor its index)
        for s in writer.finished:
            (out / s.file).unlink(missing_ok=True)
            index_path(out / s.file).unlink(missing_ok=True)
        if isinstance(e, InputError):
            e = VideoDecodeError(str(e))
        if not isinstance(e, (VideoDecodeError, OSError)) or getattr(e, "errno", None) in _FATAL_ERRNOS:
            raise
        reason = str(e) if isinstance(e, VideoDecodeError) else f"{type(e).__name__}: {e}"
        record.update(status="failed", reason=reason, frames=0, shards=[])
    record["seconds"] = round(time.time() - t0, 3)
    S.write_json_atomic(out / STATE_DIR / f"{flat}.json", record)
    return record


def _write_video_frames(
    unit: Unit,
    path: Path,
    settings: PrepareSettings,
    threads: int,
    report: DecodeReport,
    writer: S.ShardWriter,
    sizes: Counter[str],
) -> int:
    """The sampled (or frame_list) frames of one video into ``writer``; returns how many (``sizes``: per size)."""
    frames = 0
    indices = set(unit.indices) if unit.indices is not None else None
    fps = None if indices is not None else settings.fps
    for fr in iter_video_frames(path, fps, settings.backend, threads, report, settings.sampling, indices):
        img = resize_short_side(fr.image, settings.resize_short)
        meta = {
            "source": settings.source,
            "procedure": settings.procedure,
            "video": unit.video,
            "frame_index": fr.index,
            "timestamp": fr.timestamp,
            "input": unit.input,
            "width": img.width,
            "height": img.height,
            "orig_width": int(fr.image.shape[1]),
            "orig_height": int(fr.image.shape[0]),
        }
        writer.write(
            f"{unit.video}/{fr.index:08d}",
            {"jpg": _jpeg(img, settings.jpeg_quality), "json": json.dumps(meta).encode()},
        )
        sizes[f"{img.width}x{img.height}"] += 1
        frames += 1
    return frames


def _write_images(
    unit: Unit, settings: PrepareSettings, writer: S.ShardWriter, record: dict[str, Any], sizes: Counter[str]
) -> int:
    """The images of one unit into ``writer`` (every ``image_stride``-th); corrupt ones are listed in ``record``,
    the frames written per size in ``sizes``."""
    frames = 0
    keys = unit.keys or [_image_keys(unit.files)[f] for f in unit.files]
    stride = 1 if unit.indices is not None else max(1, settings.image_stride)  # a frame_list chose them already
    for i, (member, key) in enumerate(zip(unit.members, keys, strict=True)):
        position = unit.offset + i
        if position % stride:
            continue
        try:
            arr = load_rgb_image(read_member(member))
        except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt files
            name = member.rel if member.kind == "file" else f"{member.rel} ({member.describe()})"
            record["corrupt_images"].append(f"{name} ({type(e).__name__}: {str(e)[:120]})")
            continue
        img = resize_short_side(arr, settings.resize_short)
        meta = {
            "source": settings.source,
            "procedure": settings.procedure,
            "video": unit.video,
            "frame_index": position,
            "timestamp": None,
            "input": member.rel,
            "width": img.width,
            "height": img.height,
            "orig_width": int(arr.shape[1]),
            "orig_height": int(arr.shape[0]),
        }
        writer.write(
            f"{unit.video}/{key}",
            {"jpg": _jpeg(img, settings.jpeg_quality), "json": json.dumps(meta).encode()},
        )
        sizes[f"{img.width}x{img.height}"] += 1
        frames += 1
    if frames == 0 and record["corrupt_images"]:
        raise VideoDecodeError(f"none of its {len(unit.files)} images could be read")
    return frames


def _process_unit_safe(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """process_unit for a worker: unexpected exceptions come back as a failed record with the traceback."""
    unit: Unit = args[0]
    try:
        return process_unit(*args, **kwargs)
    except OSError as e:
        if e.errno in _FATAL_ERRNOS:
            raise  # disk full / read-only output: stop the whole run
        return _failed_record(unit, e)
    except Exception as e:  # noqa: BLE001
        return _failed_record(unit, e)


def _failed_record(unit: Unit, e: BaseException | None, reason: str | None = None) -> dict[str, Any]:
    return {
        "id": unit.id,
        "kind": unit.kind,
        "input": unit.input,
        "status": "failed",
        "frames": 0,
        "shards": [],
        "reason": reason or f"unexpected error {type(e).__name__}: {e}",
        "traceback": traceback.format_exc() if e is not None else "",
        "warnings": [],
        "corrupt_images": [],
    }


# --------------------------------------------------------------------------------------------------- orchestration
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _load_records(out: Path) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    state = out / STATE_DIR
    if not state.is_dir():
        return records
    for p in sorted(state.glob("*.json")):
        if p.name == SETTINGS_FILE:
            continue
        try:
            rec = json.loads(p.read_text())
            records[rec["id"]] = rec
        except (OSError, ValueError, KeyError):
            log.warning("ignoring damaged state record %s (its input will be prepared again)", p)
    return records


def _shard_problems(out: Path, rec: dict[str, Any], verify: bool) -> list[str]:
    """The shards of a record that are missing, of another size or (``verify``) not of their recorded sha256."""
    problems = []
    for s in rec.get("shards", []):
        p = out / s["file"]
        try:
            if p.stat().st_size != s["bytes"]:
                problems.append(f"{s['file']} (size {p.stat().st_size}, recorded {s['bytes']})")
            elif verify and S.sha256_file(p) != s.get("sha256"):
                problems.append(f"{s['file']} (sha256 differs from the recorded one)")
        except OSError as e:
            problems.append(f"{s['file']} ({e.strerror or e})")
    return problems


def _finished_from(rec: dict[str, Any], unit: Unit) -> bool:
    """A finished record with shards, written from ``unit``'s input as it is now (same path and size)."""
    return (
        rec.get("status") == "ok"
        and bool(rec.get("shards"))
        and rec.get("input") == unit.input
        and rec.get("input_size") == unit.size
    )


_SHARD_NUMBER = re.compile(r"-\d{5}\.tar")


def _remove_unit_shards(out: Path, unit: Unit) -> int:
    """Delete every shard a unit wrote before (``shards/<flat>-NNNNN.tar``): a re-prepared input (replaced,
    damaged or failed) leaves no stale shard behind, also where it now gives fewer shards. Returns how many."""
    flat = S.flat_name(unit.id)
    (out / STATE_DIR / f"{flat}.json").unlink(missing_ok=True)  # its record lists them: gone with them
    folder = out / "shards"
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.glob(f"{glob_escape(flat)}-*.tar") if _SHARD_NUMBER.fullmatch(p.name[len(flat) :])]
    for p in stale:
        p.unlink(missing_ok=True)
        index_path(p).unlink(missing_ok=True)  # the loader's byte-offset index written beside it
    return len(stale)


def _sweep_temporaries(out: Path) -> int:
    """Remove temporary files left by a killed run (``.name.tmp``); returns how many."""
    n = 0
    for d in (out / "shards", out / STATE_DIR, out):
        if d.is_dir():
            for p in d.iterdir():
                if p.name.startswith(".") and p.name.endswith(".tmp"):
                    p.unlink(missing_ok=True)
                    n += 1
    return n


def _check_settings(out: Path, settings: PrepareSettings, overwrite: bool) -> None:
    path = out / STATE_DIR / SETTINGS_FILE
    if path.is_file():
        old = _SETTING_BEFORE | json.loads(path.read_text())
        new = settings.content()
        diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
        if diff and not overwrite:
            changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise PrepareError(
                f"{out} was prepared with other settings ({changes}). Mixing them would give one source two kinds "
                "of frames. Use another output=DIR, rerun with the old settings to resume, or add overwrite=true "
                "to delete the old shards and start again."
            )
        if diff and overwrite:
            log.warning("overwrite=true: removing the shards prepared with other settings in %s", out)
            _remove_prepared(out)
    elif overwrite:
        _remove_prepared(out)
    S.write_json_atomic(path, settings.content())


def _remove_prepared(out: Path) -> None:
    for sub in ("shards", STATE_DIR):
        d = out / sub
        if d.is_dir():
            for p in d.iterdir():
                if p.is_file():
                    p.unlink()
    (out / S.MANIFEST_NAME).unlink(missing_ok=True)


def build_manifest(
    out: Path,
    settings: PrepareSettings,
    units: list[Unit],
    records: dict[str, dict[str, Any]],
    summary: PrepareSummary,
    kept: Sequence[dict[str, Any]] = (),
    excluded: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest from the completion records of the current units plus ``kept``: the finished records of
    earlier runs from other input locations (a source fed from several folders or archives keeps them all)."""
    shards: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    videos_ok = pending = 0
    for u in units:
        rec = records.get(u.id)
        if rec is None:
            pending += 1
        elif rec.get("status") == "ok":
            videos_ok += 1
            shards.extend(rec["shards"])
        else:
            failed.append({"input": u.input, "reason": rec.get("reason", "?")})
    for rec in kept:
        videos_ok += 1
        shards.extend(rec["shards"])
    sizes = _frame_sizes([records[u.id] for u in units if records.get(u.id, {}).get("status") == "ok"] + list(kept))
    corrupt = sum(len(records[u.id].get("corrupt_images", [])) for u in units if u.id in records)
    corrupt += sum(len(rec.get("corrupt_images", [])) for rec in kept)
    warned = [
        {"input": u.input, "warnings": records[u.id]["warnings"]}
        for u in units
        if u.id in records and records[u.id].get("warnings")
    ] + [{"input": rec["input"], "warnings": rec["warnings"]} for rec in kept if rec.get("warnings")]
    return {
        "format": S.MANIFEST_FORMAT,
        "version": S.MANIFEST_VERSION,
        "source": settings.source,
        "procedure": settings.procedure,
        "complete": pending == 0,
        "frames": sum(s["frames"] for s in shards),
        "videos": videos_ok,
        "inputs": len(units) + len(kept),
        "pending": pending,
        "settings": settings.content() | {"backend": settings.backend},
        **({"frame_sizes": sizes} if sizes is not None else {}),
        "skipped": {"inputs": failed, "corrupt_images": corrupt},
        "decode_warnings": warned,
        "shards": shards,
        **({"excluded_videos": excluded} if excluded else {}),
        "updated": _now(),
        "tool": "surgenet-ssl",
    }


def _frame_sizes(records: Sequence[dict[str, Any]]) -> dict[str, int] | None:
    """``"WxH" -> frames`` over the finished records; None when one was written before prepare recorded sizes
    (a partial count would claim sizes the source does not have)."""
    total: Counter[str] = Counter()
    for rec in records:
        if "frame_sizes" not in rec:
            return None
        total.update(rec["frame_sizes"])
    return dict(sorted(total.items()))


def _exclude_videos(units: list[Unit], exclusion: VideoExclusion, source: str) -> dict[str, Any]:
    """The leakage guard's record: which videos of ``units`` it leaves out (logged with the entries that matched
    nothing, as a list meant for this source that matches nothing is likely a naming mismatch)."""
    videos = sorted({u.video for u in units if exclusion.match(u.video)})
    matched = {exclusion.match(v) for v in videos}
    unmatched = sorted(exclusion.ids - matched)
    log.info(
        "%s: exclude_videos (%s) leaves out %d videos: %s%s",
        source,
        exclusion.describe(),
        len(videos),
        ", ".join(videos[:20]) + (" ..." if len(videos) > 20 else ""),
        f"; {len(unmatched)} listed ids match no video here" if unmatched else "",
    )
    return exclusion.to_dict() | {"videos": videos, "unmatched": len(unmatched)}


@dataclass
class FrameList:
    """The frames to keep (e.g. the SurgeNet authors' published list), one per line (``#`` starts a comment):

    - a video frame as ``<video>/<frame index>``, ``<video>,<frame index>`` or ``<video> <frame index>``, where
      ``<video>`` is the video's id (its path without extension, as in the keys) or its file name without
      extension; ``video01/00000025`` (a key) works as is;
    - an image by its key (``<folder>/<name>``), its path relative to the input, or its file name.
    """

    path: Path
    sha256: str
    frames: dict[str, set[int]]
    names: set[str]
    entries: int

    @classmethod
    def read(cls, path: Path) -> FrameList:
        try:
            data = path.expanduser().read_bytes()
            text = data.decode("utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise PrepareError(f"frame_list={path}: cannot read it as UTF-8 text ({e})") from e
        frames: dict[str, set[int]] = {}
        names: set[str] = set()
        for line in text.splitlines():
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            names.add(entry)
            m = re.fullmatch(r"(.+?)[/,;\s]+(\d+)", entry)
            if m:
                frames.setdefault(m.group(1).strip(), set()).add(int(m.group(2)))
        if not names:
            raise PrepareError(f"frame_list={path} lists no frame")
        return cls(path, hashlib.sha256(data).hexdigest(), frames, names, len(names))

    def apply(self, units: list[Unit]) -> list[Unit]:
        """The units with only their listed frames (units with none are left out); logs what was matched."""
        kept: list[Unit] = []
        found = 0
        for u in units:
            if u.kind == "video":
                stem = u.input.rsplit("/", 1)[-1].rsplit(".", 1)[0]
                picked: set[int] = set()
                for name in {u.video, stem, u.input.rsplit(".", 1)[0]}:
                    picked |= self.frames.get(name, set())
                if picked:
                    u.indices = sorted(picked)
                    found += len(picked)
                    kept.append(u)
                continue
            chosen = [
                i
                for i, (m, key) in enumerate(zip(u.members, u.keys, strict=True))
                if {f"{u.video}/{key}", m.rel, m.rel.rsplit("/", 1)[-1], m.rel.rsplit(".", 1)[0]} & self.names
            ]
            if chosen:
                u.members = [u.members[i] for i in chosen]
                u.files, u.keys = [u.files[i] for i in chosen], [u.keys[i] for i in chosen]
                u.indices = [u.offset + i for i in chosen]
                u.size = len(chosen)
                found += len(chosen)
                kept.append(u)
        log.info(
            "frame_list=%s: %d entries; %d frames in %d of %d inputs match%s",
            self.path,
            self.entries,
            found,
            len(kept),
            len(units),
            f"; {self.entries - found} entries match no input" if found < self.entries else "",
        )
        return kept


def _as_inputs(input_path: str | Path | Iterable[str | Path]) -> list[Path]:
    paths = [input_path] if isinstance(input_path, (str, os.PathLike)) else list(input_path)
    if not paths:
        raise PrepareError("input= is empty: give the folder (or archive) with the source's videos or frames.")
    out: list[Path] = []
    for p in paths:
        path = Path(p).expanduser()
        if path.resolve() not in [q.resolve() for q in out]:
            out.append(path)
    return out


def _discover_all(
    inputs: list[Path], out: Path, ignored: Counter[str], input_prefix: bool, select: Selection | None
) -> list[Unit]:
    """The units of every input location; two inputs giving the same id are refused (their frames would share keys)."""
    units: list[Unit] = []
    owner: dict[str, Unit] = {}
    for src in inputs:
        found = discover_units(src, exclude=[out], ignored=ignored, select=select)
        if input_prefix:
            prefix = S.sanitize_id(src.name.split(".")[0] or "input")
            for u in found:
                u.id, u.video = f"{prefix}/{u.id}", f"{prefix}/{u.video}"
        for u in found:
            other = owner.get(u.id)
            if other is not None:
                raise PrepareError(
                    f"{Path(other.root) / other.input} and {Path(u.root) / u.input} would both be video {u.id!r} of "
                    "this source (same relative path in two inputs). Give their common parent folder as input=, or "
                    "add input_prefix=true to put each input's name in front of its keys."
                )
            owner[u.id] = u
        units.extend(found)
    flats: dict[str, str] = {}
    for u in units:  # flat_name is one-to-one; this guards against a crafted hash collision all the same
        if flats.setdefault(S.flat_name(u.id), u.id) != u.id:
            raise PrepareError(f"videos {flats[S.flat_name(u.id)]!r} and {u.id!r} map to one shard name; rename one")
    return sorted(units, key=lambda u: u.id)


def _earlier_records(
    out: Path, units: list[Unit], roots: set[str], records: dict[str, dict[str, Any]], verify: bool = True
) -> list[dict[str, Any]]:
    """Finished records of earlier runs that this run's inputs do not cover: kept in the manifest (merge).

    A record from one of this run's input locations whose input is gone (deleted, or now excluded) is left out of
    the manifest, with a warning; its shards stay on disk. A record of another location whose id a current unit
    takes is a conflict (refused before anything is written)."""
    current = {u.id: u for u in units}
    kept: list[dict[str, Any]] = []
    gone: list[str] = []
    damaged: list[str] = []
    for rid, rec in sorted(records.items()):
        root = rec.get("root", "")
        unit = current.get(rid)
        if unit is not None:
            moved = root and root not in roots and rec.get("status") == "ok"
            if moved and (rec.get("input") != unit.input or rec.get("input_size") != unit.size):
                raise PrepareError(
                    f"{Path(unit.root) / unit.input} would replace video {rid!r} prepared earlier from "
                    f"{Path(root) / rec.get('input', '?')} (another input location). Nothing was written. Add "
                    "input_prefix=true to keep both (each input's name in front of its keys), or use another output=."
                )
            continue
        if rec.get("status") != "ok":
            continue
        if root in roots:
            gone.append(rec.get("input", rid))
            continue
        problems = _shard_problems(out, rec, verify) if rec.get("shards") else ["no shards"]
        if problems:
            damaged.append(f"{Path(root or '.') / rec.get('input', rid)}: {problems[0]}")
            continue
        kept.append(rec)
    if damaged:
        log.warning(
            "%d inputs prepared earlier from other locations have damaged or missing shards: left out of the "
            "manifest; rerun prepare with those inputs (input=[...]) to prepare them again: %s",
            len(damaged),
            "; ".join(damaged[:10]) + (" ..." if len(damaged) > 10 else ""),
        )
    if gone:
        log.warning(
            "%d inputs prepared earlier are not in this run's inputs any more (deleted, or excluded now): left out "
            "of the manifest, their shards stay in %s: %s",
            len(gone),
            out,
            ", ".join(gone[:10]) + (" ..." if len(gone) > 10 else ""),
        )
    return kept


def prepare_source(
    input_path: str | Path | Iterable[str | Path],
    output: str | Path,
    settings: PrepareSettings,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
    manifest_every_s: float = 30.0,
    max_units: int | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    input_prefix: bool = False,
    select: Selection | None = None,
    verify: bool = True,
    exclude_videos: VideoExclusion | None = None,
) -> PrepareSummary:
    """Prepare one source from one or several input locations. ``workers=0`` runs in this process (no pool).

    The manifest lists every finished input of ``output``: those of this run's inputs and those prepared earlier
    from other locations (running again with a new ``input`` adds to the source; nothing is dropped silently).
    ``exclude_videos`` leaves those videos out (the leakage guard: downstream validation/test videos), logged and
    recorded in the manifest. A rerun checks every finished input's shards against their recorded sha256
    (``verify=False``: sizes only) and prepares the damaged ones again, removing the shards they wrote before.
    ``max_units`` stops after that many new units (used to simulate an interrupted run in tests/benchmarks).
    Returns the summary (also logged).
    """
    t0 = time.time()
    inputs, out = _as_inputs(input_path), Path(output)
    if settings.fps is not None and settings.fps < 0:
        raise PrepareError(f"fps must be > 0 (or null for every frame), got {settings.fps}")
    if not 1 <= settings.jpeg_quality <= 100:
        raise PrepareError(f"jpeg_quality must be in 1..100, got {settings.jpeg_quality}")
    if settings.sampling not in SAMPLING_RULES:
        raise PrepareError(f"sampling={settings.sampling!r}: use one of {', '.join(SAMPLING_RULES)}")
    listed: FrameList | None = None
    if settings.frame_list:
        listed = FrameList.read(Path(settings.frame_list))
        settings = dataclasses.replace(settings, frame_list_sha256=listed.sha256)
    ignored: Counter[str] = Counter()
    units = _discover_all(inputs, out, ignored, input_prefix, select)
    where = ", ".join(str(p) for p in inputs)
    if ignored[EXCLUDED]:
        log.info("%s: %d files left out by %s", settings.source, ignored[EXCLUDED], select)
    if listed is not None:
        units = listed.apply(units)
    excluded = _exclude_videos(units, exclude_videos, settings.source) if exclude_videos else None
    if excluded is not None:
        units = [u for u in units if u.video not in excluded["videos"]]
    if not units:
        raise PrepareError(
            f"No videos ({', '.join(VIDEO_EXTENSIONS)}) or images ({', '.join(IMAGE_EXTENSIONS)}) found under "
            f"input={where}"
            + (f" with {select} (include=[] exclude=[] read every file)" if ignored[EXCLUDED] else "")
            + (f" listed in frame_list={settings.frame_list}" if listed is not None else "")
            + "."
        )
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, settings, overwrite)
    swept = _sweep_temporaries(out)
    if swept:
        log.info("removed %d temporary files left by an interrupted run in %s", swept, out)
    summary = PrepareSummary(settings.source, str(out), units_total=len(units), files_ignored=dict(ignored))
    records = _load_records(out)
    kept = _earlier_records(out, units, {str(p.resolve()) for p in inputs}, records, verify)
    todo = []
    for u in units:
        rec = records.get(u.id)
        if rec is not None and _finished_from(rec, u):
            problems = _shard_problems(out, rec, verify)
            if not problems:
                summary.units_done_before += 1
                continue
            summary.units_damaged.append(f"{u.input}: {', '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}")
        records.pop(u.id, None)
        todo.append(u)
    if summary.units_damaged:
        log.warning(
            "%d finished inputs have shards that fail their sha256 check (damaged or replaced on disk): preparing "
            "them again: %s",
            len(summary.units_damaged),
            "; ".join(summary.units_damaged[:10]) + (" ..." if len(summary.units_damaged) > 10 else ""),
        )
    if max_units is not None:
        todo = todo[:max_units]
    stale = sum(_remove_unit_shards(out, u) for u in todo)
    if stale:
        log.info("removed %d shards written earlier by the %d inputs to prepare again", stale, len(todo))
    log.info(
        "%s: %d inputs under %s (%d done before, %d to do) -> %s",
        settings.source,
        len(units),
        where,
        summary.units_done_before,
        len(todo),
        out,
    )
    if kept:
        roots = sorted({str(rec.get("root") or "?") for rec in kept})
        log.info(
            "%s: keeping %d inputs (%d frames) prepared earlier from %s",
            settings.source,
            len(kept),
            sum(int(rec.get("frames", 0)) for rec in kept),
            ", ".join(roots),
        )

    last_write = time.time()

    def handle(rec: dict[str, Any]) -> None:
        nonlocal last_write
        records[rec["id"]] = rec
        if rec["status"] == "ok":
            summary.units_done_now += 1
            summary.frames_written_now += rec["frames"]
        else:
            summary.units_failed.append({"input": rec["input"], "reason": rec.get("reason", "?")})
            log.warning("skipped %s: %s", _input_path(rec), rec.get("reason"))
            if rec.get("traceback"):
                log.debug(rec["traceback"])
        if rec.get("warnings"):
            summary.videos_with_warnings += 1
        for w in rec.get("warnings", []):
            summary.warnings.append(w)
            log.warning("%s", w)
        for c in rec.get("corrupt_images", []):
            summary.images_corrupt += 1
            log.warning("skipped corrupt image %s", c)
        if on_record is not None:
            on_record(rec)
        if time.time() - last_write > manifest_every_s:
            manifest = build_manifest(out, settings, units, records, summary, kept, excluded)
            S.write_json_atomic(out / S.MANIFEST_NAME, manifest)
            last_write = time.time()

    bar = _progress(total=len(todo), enabled=progress, desc=f"prepare {settings.source}")
    try:
        if workers <= 0 or len(todo) <= 1:
            for u in todo:
                handle(_process_unit_safe(u, u.root, str(out), settings, 0))
                _tick(bar, records, u)
        else:
            _run_pool(todo, str(out), settings, workers, handle, bar, records)
    finally:
        if bar is not None:
            bar.close()
        manifest = build_manifest(out, settings, units, records, summary, kept, excluded)
        manifest["last_run"] = {
            "finished": _now(),
            "seconds": round(time.time() - t0, 2),
            "frames_written": summary.frames_written_now,
            "failed": len(summary.units_failed),
            "corrupt_images": summary.images_corrupt,
            "inputs_kept_from_earlier_runs": len(kept),
        }
        S.write_json_atomic(out / S.MANIFEST_NAME, manifest)
    summary.frames_total = manifest["frames"]
    summary.shards_total = len(manifest["shards"])
    summary.units_kept = len(kept)
    summary.frames_kept = sum(int(rec.get("frames", 0)) for rec in kept)
    summary.seconds = time.time() - t0
    for line in summary.lines():
        log.info(line)
    return summary


def _input_path(rec: dict[str, Any]) -> Path:
    root = Path(rec.get("root") or ".")
    return root if root.is_file() else root / rec["input"]


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="video", dynamic_ncols=True)


def _tick(bar: Any, records: dict[str, dict[str, Any]], unit: Unit) -> None:
    if bar is not None:
        bar.update(1)
        rec = records.get(unit.id, {})
        bar.frames = getattr(bar, "frames", 0) + int(rec.get("frames", 0))
        bar.set_postfix(frames=bar.frames, refresh=False)


def _run_pool(
    todo: list[Unit],
    out: str,
    settings: PrepareSettings,
    workers: int,
    handle: Callable[[dict[str, Any]], None],
    bar: Any,
    records: dict[str, dict[str, Any]],
) -> None:
    """Process units in ``workers`` spawned processes. A worker that dies (e.g. a decoder segfault) breaks the
    pool: the units that were in flight are then retried one at a time in a fresh single process, so only the
    culprit is skipped ("worker crashed") and everything else goes on."""
    ctx = mp.get_context("spawn")  # no fork after threads (decoders, tqdm); same behaviour on every OS
    threads = max(1, _cpus() // workers)  # decoder threads per worker: use the cores, do not oversubscribe
    queue = list(reversed(todo))
    suspects: list[Unit] = []
    while queue:
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            running: dict[cf.Future[dict[str, Any]], Unit] = {}
            broken = False
            while (queue or running) and not broken:
                while queue and len(running) < 2 * workers:
                    u = queue.pop()
                    running[pool.submit(_process_unit_safe, u, u.root, out, settings, threads)] = u
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    u = running.pop(fut)
                    try:
                        handle(fut.result())
                        _tick(bar, records, u)
                    except cf.process.BrokenProcessPool:
                        broken = True
                        suspects.append(u)
            if broken:
                suspects.extend(running.values())
                pool.shutdown(wait=False, cancel_futures=True)
        for u in suspects:  # isolate: one process per suspect
            with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as single:
                try:
                    rec = single.submit(_process_unit_safe, u, u.root, out, settings, 1).result()
                except cf.process.BrokenProcessPool:
                    rec = _failed_record(u, None, "the decoder crashed the worker process (corrupt file?)")
            handle(rec)
            _tick(bar, records, u)
        suspects = []


def settings_dict(settings: PrepareSettings) -> dict[str, Any]:
    return asdict(settings)

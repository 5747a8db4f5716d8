"""Downstream sets released as videos plus per-frame annotation files: Cholec80 phases and tool presence, HeiChole
phases. ``data.train`` names the unzipped release; its videos are decoded once at 1 fps (the frames whose index is a
multiple of ``int(fps)``, as SurgeNet samples) into ``data.frames_dir/<set>/<video>/<video>_<index>.jpg``, and every
frame is labelled by the annotation row of its own index, so no frame-rate arithmetic can shift a label.

- Cholec80 (``data.format=cholec80_phase`` | ``cholec80_tool``): ``videos/videoNN.mp4`` (25 fps),
  ``phase_annotations/videoNN-phase.txt`` (``Frame<TAB>Phase`` header, a row per frame) and
  ``tool_annotations/videoNN-tool.txt`` (``Frame<TAB>Grasper<TAB>...`` header, a row every 25th frame, 7 tools 0/1:
  multi-label). Without a split given, the usual 40/40 split: videos 1-40 train, 41-80 evaluation.
- HeiChole (``data.format=heichole_phase``): ``Videos/Full/Hei-CholeN.mp4`` (25 or 50 fps; the ``HD/`` copies and
  ``Skill/`` clips are not used) and ``Annotations/Phase/Hei-CholeN_Annotation_Phase.csv`` (``<frame>,<phase id>``,
  no header, at the video's own rate); phase ids 0-6 are the Cholec80 phases. Its test videos' annotations are not
  public: hold out videos with ``data.val_groups``.

Frames after the last annotated row (a video's unannotated tail) are left out and counted in the log; a frame
inside the annotated range without a row is an error naming the annotation file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from surgenet_ssl.data.video import VideoDecodeError, iter_video_frames

from .classification_data import CHOLEC80_PHASES, ClsSample, read_phase_annotation

__all__ = [
    "VIDEO_SET_FORMATS",
    "CHOLEC80_TOOLS",
    "read_tool_annotation",
    "read_heichole_phases",
    "extract_frames",
    "video_set_samples",
    "apply_split_defaults",
]

log = logging.getLogger(__name__)

VIDEO_SET_FORMATS = ("cholec80_phase", "cholec80_tool", "heichole_phase")
CHOLEC80_TOOLS = ("Grasper", "Bipolar", "Hook", "Scissors", "Clipper", "Irrigator", "SpecimenBag")
# the split used when none is given: (train videos, evaluation videos) as shipped lists (surgenet_ssl/data/video_lists)
DEFAULT_SPLITS = {
    "cholec80_phase": ("cholec80_train", "cholec80_test"),
    "cholec80_tool": ("cholec80_train", "cholec80_test"),
}
_JPEG_QUALITY = 95
_INDEX = re.compile(r"_(\d+)$")

Labels = dict[int, Any]  # frame index -> phase name or 0/1 tuple


def read_tool_annotation(path: Path) -> tuple[list[str], Labels]:
    """``Frame<TAB>Tool...`` header then ``<frame> 0/1 ...`` rows -> (tool names, frame index -> 0/1 tuple)."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    header = lines[0].split() if lines else []
    if len(header) < 2 or header[0].lower() != "frame":
        raise ValueError(f"{path}, line 1: expected the header 'Frame<TAB><tool>...', got {lines[:1]}.")
    tools = header[1:]
    rows: Labels = {}
    for line_no, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(header) or not parts[0].isdigit() or any(v not in ("0", "1") for v in parts[1:]):
            raise ValueError(
                f"{path}, line {line_no}: expected a frame index and {len(tools)} values 0/1 ({', '.join(tools)}), "
                f"got {line!r}."
            )
        rows[int(parts[0])] = tuple(int(v) for v in parts[1:])
    if not rows:
        raise ValueError(f"{path} holds no annotation rows.")
    return tools, rows


def read_heichole_phases(path: Path) -> Labels:
    """``<frame>,<phase id>`` rows (no header) -> frame index -> Cholec80 phase name."""
    rows: Labels = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        last = len(CHOLEC80_PHASES) - 1
        if len(parts) != 2 or not parts[0].isdigit() or not parts[1].isdigit() or int(parts[1]) > last:
            raise ValueError(f"{path}, line {line_no}: expected '<frame index>,<phase id 0-{last}>', got {line!r}.")
        rows[int(parts[0])] = CHOLEC80_PHASES[int(parts[1])]
    if not rows:
        raise ValueError(f"{path} holds no annotation rows.")
    return rows


def _cholec80_phases(path: Path) -> Labels:
    return {i: phase for i, phase in enumerate(read_phase_annotation(path)) if phase}


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One process extracts at a time (DDP ranks on one machine wait, then find the frames done)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".extract.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        os.close(fd)


def extract_frames(videos: dict[str, Path], out_root: Path, fps: float = 1.0) -> dict[str, Path]:
    """Decode ``videos`` (id -> file) at ``fps`` into ``out_root/<id>/<id>_<frame index>.jpg``, once: a finished
    video has a ``.done.json`` naming its source and size, and is reused while they match."""
    folders = {}
    with _locked(out_root):
        for vid, path in sorted(videos.items()):
            dest = out_root / vid
            record = {"source": str(path.resolve()), "bytes": path.stat().st_size, "fps": fps}
            marker = dest / ".done.json"
            try:
                done = json.loads(marker.read_text())
            except (OSError, ValueError):
                done = {}
            if {k: done.get(k) for k in record} == record:
                folders[vid] = dest
                continue
            partial = out_root / f".{vid}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            count = 0
            try:
                for frame in iter_video_frames(path, fps=fps, sampling="surgenet"):
                    Image.fromarray(frame.image).save(partial / f"{vid}_{frame.index:06d}.jpg", quality=_JPEG_QUALITY)
                    count += 1
            except VideoDecodeError as e:
                shutil.rmtree(partial, ignore_errors=True)
                raise ValueError(f"Cannot decode {path}: {e}") from e
            (partial / ".done.json").write_text(json.dumps({**record, "frames": count}))
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(partial, dest)
            log.info("extracted %d frames at %g fps from %s into %s", count, fps, path, dest)
            folders[vid] = dest
    return folders


def _find(root: Path, pattern: str, skip: tuple[str, ...] = ()) -> dict[str, Path]:
    """Files under ``root`` whose name matches ``pattern`` (its ``id`` group names the video), hidden and ``skip``
    folders excluded; two files for one video are an error."""
    found: dict[str, Path] = {}
    regex = re.compile(pattern, re.IGNORECASE)
    for p in sorted(root.rglob("*")):
        parts = p.relative_to(root).parts
        if any(x.startswith(".") or x.lower() in skip for x in parts[:-1]) or not p.is_file():
            continue
        m = regex.fullmatch(p.name)
        if m is None:
            continue
        vid = m.group("id")
        if vid in found:
            raise ValueError(f"Two files for video {vid} under {root}: {found[vid]} and {p}.")
        found[vid] = p
    return found


def _release(fmt: str, root: Path) -> tuple[dict[str, Path], dict[str, Path], Callable[[Path], Labels], str]:
    """(videos, annotation files, annotation reader, set name) of a release folder."""
    if fmt.startswith("cholec80"):
        videos = _find(root, r"(?P<id>video\d+)\.(mp4|avi|mkv|mov)")
        if fmt == "cholec80_phase":
            return videos, _find(root, r"(?P<id>video\d+)-phase\.txt"), _cholec80_phases, "cholec80"
        return videos, _find(root, r"(?P<id>video\d+)-tool\.txt"), lambda p: read_tool_annotation(p)[1], "cholec80"
    videos = _find(root, r"(?P<id>hei-chole\d+)\.(mp4|avi|mkv|mov)", skip=("hd", "skill"))
    return videos, _find(root, r"(?P<id>hei-chole\d+)_annotation_phase\.csv"), read_heichole_phases, "heichole"


def criteria_of(fmt: str, root: Path) -> list[str] | None:
    """The tool names of a Cholec80 tool release (from its first file's header); None for the phase sets."""
    if fmt != "cholec80_tool":
        return None
    files = _find(root, r"(?P<id>video\d+)-tool\.txt")
    return read_tool_annotation(next(iter(files.values())))[0] if files else list(CHOLEC80_TOOLS)


def video_set_samples(
    fmt: str, release: str | os.PathLike, frames_dir: str | os.PathLike, wanted: Callable[[str], bool] | None = None
) -> list[ClsSample]:
    """Samples of the videos of ``release`` that ``wanted`` accepts (all by default), frames extracted on first use."""
    root = Path(release).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"{fmt}: release folder not found: {root} (unzip the release and pass its folder as data.train)."
        )
    videos, annotations, read, name = _release(fmt, root)
    if not videos:
        example = "videos/video01.mp4" if name == "cholec80" else "Videos/Full/Hei-Chole1.mp4"
        raise ValueError(f"{fmt}: no videos under {root} (expected e.g. {example}).")
    if not annotations:
        raise ValueError(
            f"{fmt}: no annotation files under {root} for the videos found ({', '.join(list(videos)[:3])}, ...)."
        )
    unannotated = sorted(set(videos) - set(annotations))
    without_video = sorted(set(annotations) - set(videos))
    if unannotated or without_video:
        log.warning(
            "%s: %d video(s) without annotation file (not used: %s) and %d annotation file(s) without video (%s)",
            fmt,
            len(unannotated),
            ", ".join(unannotated[:5]) or "-",
            len(without_video),
            ", ".join(without_video[:5]) or "-",
        )
    chosen = {v: videos[v] for v in sorted(set(videos) & set(annotations)) if wanted is None or wanted(v)}
    folders = extract_frames(chosen, Path(frames_dir).expanduser() / name)
    samples: list[ClsSample] = []
    tail = 0
    for vid, folder in folders.items():
        labels = read(annotations[vid])
        last = max(labels)
        for frame in sorted(folder.glob("*.jpg")):
            m = _INDEX.search(frame.stem)
            if m is None:
                raise ValueError(f"{frame}: no frame index in the name (expected {vid}_<index>.jpg).")
            index = int(m.group(1))
            if index > last:
                tail += 1
                continue
            if index not in labels:
                raise ValueError(
                    f"{annotations[vid]}: no row for frame {index} of {videos[vid]} (frame {frame.name}); rows "
                    f"{min(labels)}..{last}. Is it the annotation of this video?"
                )
            samples.append(ClsSample(str(frame), labels[index], f"{vid}/{frame.name}", vid))
    if tail:
        log.info("%s: %d frame(s) after the last annotated row of their video left out", fmt, tail)
    if not samples:
        raise ValueError(f"Empty split: no annotated frames of the chosen videos of {root}.")
    return samples


def apply_split_defaults(data_cfg: Any) -> list[str]:
    """For a video set with a usual split (Cholec80: 40/40), set ``data.val`` and the split's video lists where the
    command gives no split of its own (no data.val, data.val_groups, data.train_videos nor data.val_videos)."""
    fmt = str(data_cfg.get("format"))
    if fmt not in DEFAULT_SPLITS or not data_cfg.get("train"):
        return []
    if any(data_cfg.get(k) for k in ("val", "val_groups", "train_videos", "val_videos")):
        return []
    train_list, val_list = DEFAULT_SPLITS[fmt]
    data_cfg.val = data_cfg.train
    data_cfg.train_videos, data_cfg.val_videos = train_list, val_list
    applied = [f"data.val={data_cfg.train}", f"data.train_videos={train_list}", f"data.val_videos={val_list}"]
    log.info("%s: the usual split (%s)", fmt, ", ".join(applied))
    return applied

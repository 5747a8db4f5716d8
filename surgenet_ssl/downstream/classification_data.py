"""Frame classification datasets: a CSV of frames and labels, and Cholec80-style phase annotation files.

CSV (``data.format=csv``, ``data.train=labels.csv``): a header row with a ``path`` column (relative to the CSV's
folder, or to ``data.image_root``) and either

- one ``label`` column (single-label: class names or integer ids), or
- several 0/1 columns (multi-label, e.g. the three critical-view-of-safety criteria): ``data.label_columns=[c1,c2]``,
  or every column that is neither the path nor the video column.

An optional ``video`` (or ``case``, ``patient``, ``group``) column names the case (used for low-data fractions).

Cholec80 phases (``data.format=cholec80``): frames extracted from the videos into one folder per video, and one
annotation file per video (``<video>-phase.txt``: a header line, then ``<frame index>\\t<phase name>`` at the video's
frame rate, 25 fps for Cholec80)::

    data.train=FRAMES/ (FRAMES/video01/video01_000001.png, ...)   data.annotations=phase_annotations/

The number in a frame's file name (its last integer) counts frames at ``data.frames_fps`` (1 for the usual 1-fps
extraction) starting at ``data.first_frame_number``; it is mapped to the annotation row
``round((n - first) * annotation_fps / frames_fps)``. A frame without an annotation row is an error naming it.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from surgenet_ssl.evaluation.features import IMAGE_EXTENSIONS

__all__ = [
    "CHOLEC80_PHASES",
    "ClsSample",
    "ClassificationDataset",
    "csv_samples",
    "cholec80_samples",
    "read_phase_annotation",
    "load_classification_split",
    "CLASSIFICATION_FORMATS",
]

log = logging.getLogger(__name__)

CHOLEC80_PHASES = (
    "Preparation",
    "CalotTriangleDissection",
    "ClippingCutting",
    "GallbladderDissection",
    "GallbladderPackaging",
    "CleaningCoagulation",
    "GallbladderRetraction",
)
_PATH_COLUMNS = ("path", "image", "file", "filename", "frame")
_LABEL_COLUMNS = ("label", "class", "phase")
_GROUP_COLUMNS = ("video", "case", "patient", "group")


@dataclass(frozen=True)
class ClsSample:
    path: str
    target: str | tuple[int, ...]  # class name (single-label, resolved to an index later) or 0/1s (multi-label)
    key: str
    group: str | None


def _pick(columns: Sequence[str], choices: Sequence[str]) -> str | None:
    lower = {c.strip().lower(): c for c in columns}
    return next((lower[c] for c in choices if c in lower), None)


def _read_csv_rows(path: Path) -> list[list[str]]:
    """The rows of a UTF-8 CSV; ``utf-8-sig`` drops the byte-order mark Excel writes (else the first column would
    be named ``\ufeffpath``). Another encoding is an error naming the file, the position and the fix."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.reader(f))
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1 if isinstance(e.object, bytes) else "?"
        raise ValueError(
            f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at line {line}; {e.reason}). Save it as "
            "'CSV UTF-8' (Excel), or convert it, e.g. `iconv -f latin1 -t utf-8 in.csv > out.csv`."
        ) from e


def _binary(value: str) -> int | None:
    """0 or 1 for ``0``, ``1``, ``0.0``, ``1.0``; None for anything else (a rater mean such as 0.67 is not a label:
    ``int(float("0.67"))`` would silently make it 0)."""
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if number in (0.0, 1.0) else None


def csv_samples(
    csv_path: str | os.PathLike, label_columns: Sequence[str] | None = None, image_root: str | None = None
) -> tuple[list[ClsSample], list[str] | None]:
    """Samples of a CSV and, for multi-label files, the criterion names (None: single-label)."""
    path = Path(csv_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Label CSV not found: {path}")
    rows = _read_csv_rows(path)
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise ValueError(f"Empty split: {path} has no header and no rows.")
    header, body = [c.strip() for c in rows[0]], rows[1:]
    path_col = _pick(header, _PATH_COLUMNS)
    if path_col is None:
        raise ValueError(f"{path}: no image path column (one of {', '.join(_PATH_COLUMNS)}) in header {header}.")
    group_col = _pick(header, _GROUP_COLUMNS)
    if label_columns:
        labels = [str(c) for c in label_columns]
        missing = [c for c in labels if c not in header]
        if missing:
            raise ValueError(f"{path}: data.label_columns {missing} are not in the header {header}.")
        multilabel = True
    else:
        single = _pick(header, _LABEL_COLUMNS)
        labels = [single] if single else [c for c in header if c not in (path_col, group_col)]
        multilabel = single is None
        if not labels:
            raise ValueError(f"{path}: no label column (label, or 0/1 criterion columns) in header {header}.")
    base = Path(image_root).expanduser() if image_root else path.parent
    idx = {c: header.index(c) for c in header}
    samples: list[ClsSample] = []
    for line, row in enumerate(body, start=2):
        row = row + [""] * (len(header) - len(row))
        rel = row[idx[path_col]].strip()
        if not rel:
            raise ValueError(f"{path}, line {line}: empty image path.")
        values = [row[idx[c]].strip() for c in labels]
        if any(v == "" for v in values):
            empty = [c for c, v in zip(labels, values, strict=True) if v == ""]
            raise ValueError(f"{path}, line {line} ({rel}): missing label in column(s) {empty}.")
        target: str | tuple[int, ...]
        if multilabel:
            bad = [f"{c}={v}" for c, v in zip(labels, values, strict=True) if _binary(v) is None]
            if bad:
                raise ValueError(
                    f"{path}, line {line} ({rel}): multi-label values must be 0 or 1, got {', '.join(bad)}. "
                    "Rater means (e.g. Endoscapes' 0.33 / 0.67) are not thresholded in a plain CSV: use "
                    "data.format=endoscapes_cvs for the Endoscapes release, or write 0/1 labels."
                )
            target = tuple(int(_binary(v) or 0) for v in values)
        else:
            target = values[0]
        image = Path(rel) if Path(rel).is_absolute() else base / rel
        group = row[idx[group_col]].strip() or None if group_col else None
        samples.append(ClsSample(str(image), target, rel, group))
    if not samples:
        raise ValueError(f"Empty split: {path} has a header but no rows.")
    return samples, (labels if multilabel else None)


def read_phase_annotation(path: Path) -> list[str]:
    """``<frame>\\t<phase>`` lines (after an optional header) -> the phase of every frame index, checked dense."""
    phases: dict[int, str] = {}
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 or not parts[0].lstrip("-").isdigit():
            if line_no == 1:
                continue  # header ("Frame Phase")
            raise ValueError(f"{path}, line {line_no}: expected '<frame index> <phase>', got {line!r}.")
        phases[int(parts[0])] = parts[1]
    if not phases:
        raise ValueError(f"{path} holds no annotation rows.")
    first, last = min(phases), max(phases)
    gaps = [i for i in range(first, last + 1) if i not in phases]
    if gaps:
        raise ValueError(f"{path}: frame indices {gaps[:5]} have no phase (rows must cover every frame).")
    return [phases.get(i, "") for i in range(last + 1)]


_LAST_INT = re.compile(r"(\d+)(?!.*\d)")


def cholec80_samples(
    frames_dir: str | os.PathLike,
    annotations_dir: str | os.PathLike | None,
    annotation_fps: float,
    frames_fps: float,
    first_frame_number: int = 0,
) -> list[ClsSample]:
    """Frames of every video folder under ``frames_dir`` that has an annotation file, labelled by phase."""
    frames_root = Path(frames_dir).expanduser()
    if not frames_root.is_dir():
        raise FileNotFoundError(f"Frames folder not found: {frames_root}")
    if annotations_dir is None:
        raise ValueError("data.format=cholec80 needs data.annotations=DIR (the <video>-phase.txt files).")
    ann_root = Path(annotations_dir).expanduser()
    if not ann_root.is_dir():
        raise FileNotFoundError(f"Phase annotation folder not found: {ann_root}")
    annotations = {}
    for p in sorted(ann_root.glob("*.txt")):
        m = re.match(r"(.+?)[-_]phase$", p.stem)
        if m:
            annotations[m.group(1)] = p
    if not annotations:
        raise ValueError(f"No phase annotation files (<video>-phase.txt) in {ann_root}.")
    ratio = float(annotation_fps) / float(frames_fps)
    samples: list[ClsSample] = []
    videos = sorted(d for d in frames_root.iterdir() if d.is_dir() and not d.name.startswith("."))
    unannotated = [v.name for v in videos if v.name not in annotations]
    if unannotated:
        log.warning(
            "%d video folder(s) in %s have no phase annotation and are skipped: %s",
            len(unannotated),
            frames_root,
            ", ".join(unannotated[:5]),
        )
    for video in videos:
        if video.name not in annotations:
            continue
        phases = read_phase_annotation(annotations[video.name])
        for frame in sorted(p for p in video.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
            m = _LAST_INT.search(frame.stem)
            if m is None:
                raise ValueError(f"{frame}: no frame number in the file name (expected e.g. {video.name}_000123.png).")
            index = round((int(m.group(1)) - first_frame_number) * ratio)
            if not 0 <= index < len(phases) or not phases[index]:
                raise ValueError(
                    f"{frame}: frame number {m.group(1)} -> annotation frame {index}, but "
                    f"{annotations[video.name]} annotates frames 0..{len(phases) - 1} (missing label). Check "
                    "data.annotation_fps, data.frames_fps and data.first_frame_number."
                )
            samples.append(ClsSample(str(frame), phases[index], frame.relative_to(frames_root).as_posix(), video.name))
    if not samples:
        raise ValueError(
            f"Empty split: no annotated frames under {frames_root} (videos: "
            f"{[v.name for v in videos][:5]}; annotated: {sorted(annotations)[:5]})."
        )
    return samples


CLASSIFICATION_FORMATS = ("csv", "cholec80", "endoscapes_cvs", "cholec80_phase", "cholec80_tool", "heichole_phase")


def _video_selection(data_cfg, split: str):
    """``data.<split>_videos`` (shipped list names, files or ids) as a VideoExclusion used as a selection, or None."""
    from surgenet_ssl.data.video_exclusion import load_video_exclusion

    value = data_cfg.get(f"{split}_videos")
    return load_video_exclusion(value, setting=f"data.{split}_videos") if value else None


def _keep_videos(samples: list[ClsSample], selection, setting: str, where: str) -> list[ClsSample]:
    """The samples of the selected videos; a listed video that is absent is an error (a split is incomplete)."""
    groups = {s.group for s in samples if s.group is not None}
    if not groups:
        raise ValueError(f"{setting}: {where} names no video per sample (a video column or video folders).")
    chosen = {g for g in groups if selection.match(g)}
    absent = sorted(selection.ids - {selection.match(g) for g in chosen})
    if absent:
        raise ValueError(
            f"{setting} ({', '.join(selection.origins)}): {len(absent)} listed video(s) not in {where}: "
            f"{', '.join(absent[:8])}. Get the whole release, or list only the videos you have."
        )
    kept = [s for s in samples if s.group in chosen]
    log.info(
        "%s (%s): %d samples of %d videos kept, %d samples of %d other videos left out",
        setting,
        ", ".join(selection.origins),
        len(kept),
        len(chosen),
        len(samples) - len(kept),
        len(groups - chosen),
    )
    return kept


def load_classification_split(data_cfg, split: str) -> tuple[list[ClsSample], list[str] | None, str]:
    """``(samples, multi-label criteria or None, format)`` of ``data.train`` / ``data.val``, restricted to the videos
    of ``data.train_videos`` / ``data.val_videos`` where given."""
    where = str(data_cfg[split])
    fmt = data_cfg.format
    if fmt == "auto":
        fmt = "csv" if where.lower().endswith(".csv") else "cholec80" if data_cfg.get("annotations") else None
        if fmt is None:
            raise ValueError(
                f"Cannot tell the classification layout of {where}: pass a .csv file, or frame folders with "
                "data.annotations=DIR (Cholec80 phases); or set data.format to one of "
                f"{', '.join(CLASSIFICATION_FORMATS)}."
            )
    selection = _video_selection(data_cfg, split)
    criteria: list[str] | None = None
    if fmt == "csv":
        samples, criteria = csv_samples(where, data_cfg.get("label_columns"), data_cfg.get("image_root"))
    elif fmt == "cholec80":
        samples = cholec80_samples(
            where,
            data_cfg.get("annotations"),
            data_cfg.annotation_fps,
            data_cfg.frames_fps,
            int(data_cfg.get("first_frame_number") or 0),
        )
    elif fmt == "endoscapes_cvs":
        from .endoscapes import CVS_CRITERIA, cvs_samples

        samples, criteria = cvs_samples(where), list(CVS_CRITERIA)
    elif fmt in ("cholec80_phase", "cholec80_tool", "heichole_phase"):
        from .video_sets import criteria_of, video_set_samples

        frames_dir = data_cfg.get("frames_dir")
        if not frames_dir:
            raise ValueError(f"data.format={fmt} needs data.frames_dir (where the 1-fps frames are extracted once).")
        wanted = None if selection is None else (lambda v: selection.match(v) is not None)
        samples = video_set_samples(fmt, where, str(frames_dir), wanted)
        criteria = criteria_of(fmt, Path(where).expanduser())
    else:
        raise ValueError(
            f"data.format={fmt} is not a classification layout (auto, {', '.join(CLASSIFICATION_FORMATS)})"
        )
    if selection is not None:
        samples = _keep_videos(samples, selection, f"data.{split}_videos", where)
    if not samples:
        raise ValueError(f"Empty split: no samples of data.{split}={where} after data.{split}_videos.")
    return samples, criteria, fmt


class ClassificationDataset(Dataset):
    """``(image tensor, target, index)``; target: class index (long) or 0/1 vector (float)."""

    def __init__(self, samples: Sequence[ClsSample], targets: Sequence, transform: Callable):
        self.samples = list(samples)
        self.targets = list(targets)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path = self.samples[i].path
        try:
            with Image.open(path) as img:
                image = self.transform(img.convert("RGB"))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"Image not found: {path}") from err
        except Exception as err:
            raise ValueError(f"Cannot read image {path}: {type(err).__name__}: {err}") from err
        target = self.targets[i]
        y = torch.tensor(target, dtype=torch.float32) if isinstance(target, tuple) else torch.tensor(target)
        return image, y, i

    def check_files(self) -> None:
        """Every image exists and has a readable header (before training, not in epoch 7)."""
        for s in self.samples:
            try:
                with Image.open(s.path):
                    pass
            except FileNotFoundError:
                raise FileNotFoundError(f"Image not found: {s.path} (listed as {s.key}).") from None
            except Exception as err:
                raise ValueError(f"Cannot read image {s.path}: {type(err).__name__}: {err}") from err

"""Endoscapes2023 as released by CAMMA: CVS criteria (Endoscapes-CVS201) and semantic segmentation (Endoscapes-Seg50).

The release, unzipped (``data.train`` / ``data.val`` name one of its split folders)::

    ROOT/{train,val,test}/<vid>_<frame>.jpg        Endoscapes-CVS201, the official 120/41/40 video split
    ROOT/{train,val,test}_seg/<vid>_<frame>.jpg    Endoscapes-Seg50, 30/10/10 videos
    ROOT/12_5/train_{0,1,2}/, ROOT/25/train_{0,1,2}/   the official 12.5 % / 25 % label fractions (3 folds each)
    ROOT/<split>_vids.txt                          the video ids of each split (numpy's 1.000e+00 notation is read)
    ROOT/all_metadata.csv                          vid,frame,...,is_ds_keyframe,C1,C2,C3 (each C: mean of 3 raters)
    ROOT/<split>/annotation_ds_coco.json           the same labels as COCO image tags (``ds``: [C1, C2, C3])
    ROOT/semseg/<vid>_<frame>.png                  class-id masks (3 equal channels), shared by the *_seg splits
    ROOT/seg_label_map.txt                         class name <-> id

CVS labels are the mean of three raters (0, 0.33, 0.67, 1); like the official evaluation, a criterion is positive
when the mean is >= 0.5. Labels come from ``all_metadata.csv`` (rows of the split's videos that are CVS keyframes),
or from the split folder's ``annotation_ds_coco.json`` where the release has no ``all_metadata.csv``.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from surgenet_ssl.evaluation.features import IMAGE_EXTENSIONS
from surgenet_ssl.runtime.io_utils import read_text_bounded

from .classification_data import ClsSample
from .segmentation_data import SegSample

# Label files are data: their size is bounded before they are read (the release's are a few kB / a few MB).
_LIST_BYTES = 16 << 20  # video lists, the label map
_JSON_BYTES = 512 << 20  # COCO annotation files

__all__ = [
    "CVS_CRITERIA",
    "CVS_THRESHOLD",
    "OFFICIAL_FRACTIONS",
    "release_root",
    "read_video_ids",
    "cvs_samples",
    "seg_samples",
    "read_seg_label_map",
    "official_fraction_videos",
]

log = logging.getLogger(__name__)

CVS_CRITERIA = ("C1", "C2", "C3")  # two structures, hepatocystic triangle cleared, cystic plate exposed
CVS_THRESHOLD = 0.5
OFFICIAL_FRACTIONS = {0.125: "12_5", 0.25: "25"}  # data.train_fraction -> the release's folder of 3 folds
_MARKERS = ("all_metadata.csv", "train_vids.txt", "seg_label_map.txt", "semseg")


def _norm_id(token: str) -> str:
    """``1``, ``1.0`` and ``1.000000000000000000e+00`` (np.savetxt) are video 1; other ids stay as they are."""
    token = token.strip()
    try:
        number = float(token)
    except ValueError:
        return token
    return str(int(number)) if math.isfinite(number) and number == int(number) else token


def _vid_frame(name: str) -> tuple[str, str] | None:
    stem = Path(name).stem
    vid, _, frame = stem.rpartition("_")
    return (_norm_id(vid), _norm_id(frame)) if vid and frame.isdigit() else None


def release_root(split_dir: str | Path) -> Path:
    """The release folder above a split folder (``ROOT/train`` or ``ROOT/12_5/train_0``)."""
    split = Path(split_dir).expanduser()
    if not split.is_dir():
        raise FileNotFoundError(f"Endoscapes split folder not found: {split}")
    for candidate in (split.parent, split.parent.parent):
        if any((candidate / m).exists() for m in _MARKERS):
            return candidate
    raise ValueError(
        f"{split} is not a split folder of the Endoscapes2023 release: none of {', '.join(_MARKERS)} in "
        f"{split.parent} or {split.parent.parent}. Pass a split folder of the unzipped release, e.g. "
        "data.train=endoscapes/train."
    )


def read_video_ids(path: Path) -> list[str]:
    """The ids of a ``<split>_vids.txt`` (whitespace or comma separated)."""
    ids = [_norm_id(t) for t in re.split(r"[\s,]+", read_text_bounded(path, _LIST_BYTES, "utf-8-sig")) if t.strip()]
    if not ids:
        raise ValueError(f"{path} lists no video ids.")
    return ids


def _images(folder: Path) -> dict[tuple[str, str], Path]:
    """``(vid, frame) -> image`` of the ``<vid>_<frame>.jpg`` files of a split folder."""
    found = {}
    for p in folder.iterdir():
        if p.suffix.lower() in IMAGE_EXTENSIONS and (key := _vid_frame(p.name)) is not None:
            found[key] = p
    return found


def _split_videos(split: Path, root: Path, images: dict[tuple[str, str], Path]) -> tuple[set[str], str]:
    """The split's videos: ``ROOT/<split>_vids.txt`` where the release has it, else the videos of its images."""
    listed = root / f"{split.name}_vids.txt"
    if split.parent == root and listed.is_file():
        return set(read_video_ids(listed)), str(listed)
    return {vid for vid, _ in images}, f"the images in {split}"


def _threshold(value: str, where: str, criterion: str) -> int:
    try:
        mean = float(value)
    except ValueError:
        mean = math.nan
    if not 0.0 <= mean <= 1.0:  # NaN fails too
        raise ValueError(f"{where}: {criterion}={value!r} is not a rater mean in [0, 1].")
    return int(mean >= CVS_THRESHOLD)


def _labels_from_metadata(
    path: Path, videos: set[str]
) -> tuple[dict[tuple[str, str], tuple[int, ...]], dict[str, int]]:
    """CVS keyframes of ``videos`` in ``all_metadata.csv``, thresholded; counts of the rows left out."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ("vid", "frame", *CVS_CRITERIA) if c not in header]
        if missing:
            raise ValueError(f"{path}: columns {missing} missing from the header {header[:12]}.")
        labels: dict[tuple[str, str], tuple[int, ...]] = {}
        skipped = {"not_keyframe": 0, "other_split": 0}
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            vid, frame = _norm_id(row["vid"]), _norm_id(row["frame"])
            if vid not in videos:
                skipped["other_split"] += 1
                continue
            keyframe = row.get("is_ds_keyframe")
            if keyframe is not None and keyframe.lower() not in ("true", "1", "1.0"):
                skipped["not_keyframe"] += 1  # a 1-fps frame without CVS annotation
                continue
            if keyframe is None and not any(row[c] for c in CVS_CRITERIA):
                skipped["not_keyframe"] += 1
                continue
            where = f"{path}, line {line} (vid {vid}, frame {frame})"
            labels[(vid, frame)] = tuple(_threshold(row[c], where, c) for c in CVS_CRITERIA)
    return labels, skipped


def _labels_from_coco(path: Path) -> tuple[dict[tuple[str, str], tuple[int, ...]], dict[str, int]]:
    """The ``ds`` tags of the images of an ``annotation_ds_coco.json``, thresholded."""
    try:
        images = json.loads(read_text_bounded(path, _JSON_BYTES))["images"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a COCO annotation file with an 'images' list ({e}).") from e
    labels: dict[tuple[str, str], tuple[int, ...]] = {}
    skipped = {"not_keyframe": 0}
    for n, image in enumerate(images):
        name = str(image.get("file_name", ""))
        key = _vid_frame(name)
        where = f"{path}, images[{n}] ({name or 'no file_name'})"
        if key is None:
            raise ValueError(f"{where}: the file name is not <vid>_<frame>.jpg.")
        if image.get("is_ds_keyframe") is False:
            skipped["not_keyframe"] += 1
            continue
        ds = image.get("ds")
        if not isinstance(ds, list) or len(ds) != len(CVS_CRITERIA):
            raise ValueError(f"{where}: 'ds' must be the 3 criterion means [C1, C2, C3], got {ds!r}.")
        labels[key] = tuple(_threshold(str(v), where, c) for c, v in zip(CVS_CRITERIA, ds, strict=True))
    return labels, skipped


def cvs_samples(split_dir: str | Path) -> list[ClsSample]:
    """The CVS-annotated frames of one split folder: targets (C1, C2, C3) in 0/1, group = video id."""
    split = Path(split_dir).expanduser()
    root = release_root(split)
    images = _images(split)
    videos, videos_from = _split_videos(split, root, images)
    metadata, coco = root / "all_metadata.csv", split / "annotation_ds_coco.json"
    if metadata.is_file():
        labels, skipped = _labels_from_metadata(metadata, videos)
        source = metadata
    elif coco.is_file():
        labels, skipped = _labels_from_coco(coco)
        source = coco
    else:
        raise FileNotFoundError(f"No CVS labels for {split}: neither {metadata} nor {coco} exists.")
    samples = []
    for (vid, frame), target in sorted(labels.items(), key=lambda kv: (kv[0][0], int(kv[0][1]))):
        if vid not in videos:
            raise ValueError(f"{source}: frame {vid}_{frame} belongs to video {vid}, which is not in {videos_from}.")
        image = images.get((vid, frame))
        if image is None:
            raise ValueError(f"{source}: CVS keyframe {vid}_{frame} has no image {split / f'{vid}_{frame}.jpg'}.")
        samples.append(ClsSample(str(image), target, image.name, vid))
    if not samples:
        raise ValueError(f"Empty split: no CVS keyframes of {split} in {source} (videos from {videos_from}).")
    log.info(
        "Endoscapes CVS %s: %d keyframes of %d videos (videos from %s; labels from %s, mean >= %.1f; rows left "
        "out: %s)",
        split.name,
        len(samples),
        len({s.group for s in samples}),
        videos_from,
        source.name,
        CVS_THRESHOLD,
        ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in skipped.items()) or "none",
    )
    return samples


def _label_pairs(text: str, path: Path) -> list[tuple[str, int]]:
    stripped = text.strip()
    if stripped.startswith("{"):  # a printed dict {'background': 0, ...} / JSON
        try:
            mapping: Any = ast.literal_eval(stripped)
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"{path}: cannot read the class map ({e}).") from e
        if not isinstance(mapping, dict):
            raise ValueError(f"{path}: expected a mapping of class names and ids.")
        pairs = []
        for k, v in mapping.items():
            name, number = (str(v), k) if isinstance(k, int) else (str(k), v)
            if not isinstance(number, int):
                raise ValueError(f"{path}: {k!r}: {v!r} is not a class name with an integer id.")
            pairs.append((name, number))
        return pairs
    pairs = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\d+)\s*[:,=\t ]\s*(.+)|(.+?)\s*[:,=\t ]\s*(\d+)", line)
        if m is None:
            raise ValueError(f"{path}, line {line_no}: expected '<class name> <id>' (or '<id>: <name>'), got {line!r}.")
        number, name = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
        pairs.append((name.strip().strip("'\""), int(number)))
    return pairs


def read_seg_label_map(path: Path) -> list[str]:
    """Class names in id order from ``seg_label_map.txt``; the ids must be 0..n-1."""
    if not path.is_file():
        raise FileNotFoundError(f"Endoscapes class map not found: {path} (seg_label_map.txt of the release).")
    pairs = _label_pairs(read_text_bounded(path, _LIST_BYTES, "utf-8-sig"), path)
    ids = sorted(number for _, number in pairs)
    if ids != list(range(len(pairs))):
        raise ValueError(f"{path}: class ids must be 0..{len(pairs) - 1}, each once; got {ids}.")
    return [name for name, _ in sorted(pairs, key=lambda p: p[1])]


def seg_samples(split_dir: str | Path) -> tuple[list[SegSample], list[str]]:
    """Frames of an Endoscapes-Seg50 split folder with their ``ROOT/semseg`` masks, and the class names."""
    split = Path(split_dir).expanduser()
    root = release_root(split)
    classes = read_seg_label_map(root / "seg_label_map.txt")
    masks = root / "semseg"
    if not masks.is_dir():
        raise FileNotFoundError(f"Endoscapes-Seg50 masks not found: {masks}.")
    images = _images(split)
    listing = split / "annotation_coco.json"
    if listing.is_file():  # the annotated frames; other images of the folder are not used (counted)
        try:
            names = {
                Path(str(i["file_name"])).name for i in json.loads(read_text_bounded(listing, _JSON_BYTES))["images"]
            }
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{listing}: not a COCO annotation file with an 'images' list ({e}).") from e
        unlisted = sum(1 for p in images.values() if p.name not in names)
        wanted = {k: p for k, p in images.items() if p.name in names}
        absent = sorted(names - {p.name for p in images.values()})
        if absent:
            raise ValueError(f"{listing} lists {len(absent)} image(s) missing from {split}, e.g. {absent[0]}.")
    else:
        wanted, unlisted = images, 0
    videos, videos_from = _split_videos(split, root, images)
    samples = []
    for (vid, _), image in sorted(wanted.items(), key=lambda kv: (kv[0][0], int(kv[0][1]))):
        if vid not in videos:
            raise ValueError(f"{image} belongs to video {vid}, which is not in {videos_from}.")
        mask = masks / f"{image.stem}.png"
        if not mask.is_file():
            raise ValueError(f"{image} has no mask: expected {mask}.")
        samples.append(SegSample(str(image), str(mask), image.stem, vid))
    if not samples:
        raise ValueError(f"Empty split: no Endoscapes-Seg50 frames in {split}.")
    log.info(
        "Endoscapes-Seg50 %s: %d frames of %d videos, %d classes%s",
        split.name,
        len(samples),
        len({s.group for s in samples}),
        len(classes),
        f"; {unlisted} image(s) not in {listing.name} left out" if unlisted else "",
    )
    return samples, classes


def official_fraction_videos(train_dir: str | Path, fraction: float, fold: int) -> tuple[set[str], Path] | None:
    """The videos of the release's official ``fraction`` split (fold 0-2), or None where there is none (any fraction
    other than 12.5 % / 25 %). A missing folder is an error: another subset would not be comparable."""
    folder_name = next((name for f, name in OFFICIAL_FRACTIONS.items() if abs(f - fraction) < 1e-9), None)
    if folder_name is None:
        return None
    root = release_root(train_dir)
    folder = root / folder_name / f"train_{int(fold)}"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"data.train_fraction={fraction} on Endoscapes uses the official split {folder}, which is missing (folds: "
            f"data.fraction_fold=0|1|2). Use the full release, or data.official_fractions=false for a hashed subset."
        )
    coco = folder / "annotation_ds_coco.json"
    if coco.is_file():
        videos = {key[0] for key in _labels_from_coco(coco)[0]}
    else:
        videos = {vid for vid, _ in _images(folder)}
    if not videos:
        raise ValueError(f"{folder}: no <vid>_<frame>.jpg frames, so no videos for data.train_fraction={fraction}.")
    return videos, folder

"""Curation of a prepared source: per-frame scores, a curated view of the frames to train on, and a report.

Why: surgical video holds many frames a foundation model should not learn from (black frames and title cards,
out-of-body views of the operating room, blurred or smoke-filled frames, long static stretches where 1-fps sampling
gives near-identical frames), and frames that must never be used (patient opt-outs, downstream test videos).

**Curation never deletes or re-encodes**: everything it writes goes to ``<source>/curation/`` beside the shards:

- ``scores/<shard>.json``: the raw scores of each shard (:mod:`surgenet_ssl.data.frame_scores`), computed in one
  streaming pass and kept while the shard's sha256 is unchanged, so new thresholds cost no decoding;
- ``frames.csv``: one row per frame: its scores, whether it is kept and why not (``reason``, the first of
  :data:`REASONS` that applies; ``flags``, all of them);
- ``curated.json``: the curated view, the frames kept per shard, which ``dataset.curated=true`` trains on;
- ``report.json`` and ``dropped_<reason>.png``: counts per reason and a contact sheet of dropped frames per
  reason, so a person can check the thresholds.

Every file is written atomically: a killed run leaves the previous files or none, never half of one.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from surgenet_ssl.config.checks import at_least, build_section, in_range, option
from surgenet_ssl.data import location as L
from surgenet_ssl.data import shards as S
from surgenet_ssl.data.frame_scores import SCORES_VERSION, hamming, score_frame
from surgenet_ssl.data.manifest_schema import MAX_MANIFEST_BYTES
from surgenet_ssl.data.video_exclusion import FrameExclusion, VideoExclusion
from surgenet_ssl.runtime.io_utils import atomic_path

__all__ = [
    "CURATION_DIR",
    "REASONS",
    "VIEW_FORMAT",
    "CurationError",
    "CurationSettings",
    "FrameClassifier",
    "curate_source",
    "read_curated_view",
]

log = logging.getLogger(__name__)

CURATION_DIR = "curation"
VIEW_NAME = "curated.json"
VIEW_FORMAT = "surgenet-ssl/curated-view"
SCORES_FORMAT = "surgenet-ssl/frame-scores"
VIEW_VERSION = 1
# Why a frame is left out, in the order they are tested (a frame's ``reason`` is the first that applies).
REASONS = (
    "unreadable",
    "excluded_video",
    "excluded_frame",
    "dark",
    "low_information",
    "blurry",
    "out_of_body",
    "duplicate",
)


class CurationError(RuntimeError):
    """Curation cannot run or its view cannot be used (the message names the file and the fix)."""


# ------------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class DarkSettings:
    max_fraction: float = option(0.9, in_range(0.0, 1.0))  # dropped when more of the frame is near-black


@dataclass(frozen=True)
class LowInformationSettings:
    min_entropy: float = option(3.0, at_least(0.0))  # bits, over the lit pixels; dropped below


@dataclass(frozen=True)
class BlurSettings:
    min_sharpness: float = option(14.0, at_least(0.0))  # variance of the Laplacian; dropped below


@dataclass(frozen=True)
class DuplicateSettings:
    max_hamming: int = option(4, in_range(-1, 64))  # perceptual-hash bits; -1 turns duplicate removal off


@dataclass(frozen=True)
class ClassifierSettings:
    """A user's out-of-body classifier: any timm model and its weights file (through the one weight loader)."""

    model: str = option("")  # a timm model name (or a backbone of this package); "" = no classifier
    weights: str = option("")  # the weight file (.pth / .safetensors / checkpoint)
    threshold: float = option(0.5, in_range(0.0, 1.0))  # dropped when P(out of body) >= threshold
    num_classes: int = option(2, at_least(1))  # 1: a sigmoid output; >= 2: softmax
    out_of_body_class: int = option(1, at_least(0))
    input_size: int = option(224, at_least(16))
    batch_size: int = option(32, at_least(1))


@dataclass(frozen=True)
class OutOfBodySettings:
    threshold: float = option(0.7, in_range(0.0, 1.0))  # heuristic: dropped when 1 - in_body evidence > threshold
    classifier: ClassifierSettings = field(default_factory=ClassifierSettings)


@dataclass(frozen=True)
class CurationSettings:
    """The ``curate`` thresholds (surgenet_ssl/configs/curate.yaml); each default is justified on generated frames
    of each kind in tests/data/test_curation.py."""

    dark: DarkSettings = field(default_factory=DarkSettings)
    low_information: LowInformationSettings = field(default_factory=LowInformationSettings)
    blur: BlurSettings = field(default_factory=BlurSettings)
    duplicates: DuplicateSettings = field(default_factory=DuplicateSettings)
    out_of_body: OutOfBodySettings = field(default_factory=OutOfBodySettings)
    contact_sheet_frames: int = option(48, at_least(0))  # dropped frames shown per reason

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> CurationSettings:
        return build_section(cls, cfg or {}, "curate")

    def thresholds(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("contact_sheet_frames")
        return out


# ---------------------------------------------------------------------------------------------------- classifier
class FrameClassifier:
    """A user's out-of-body classifier, loaded once: ``probabilities(frames)`` -> P(out of body) per frame.

    The weight file is read by :func:`surgenet_ssl.models.weights.load_model_weights` (never unpickles code; a file
    for another architecture or number of classes is an error naming the tensors)."""

    def __init__(self, settings: ClassifierSettings) -> None:
        import torch

        from surgenet_ssl.backbones import BACKBONES, build_backbone
        from surgenet_ssl.models.weights import load_model_weights
        from surgenet_ssl.runtime.io_utils import sha256_file

        self.settings = settings
        path = Path(settings.weights).expanduser()
        if not path.is_file():
            raise CurationError(
                f"curate: out_of_body.classifier.weights={settings.weights!r} is not a file. Give the classifier's "
                "weight file (.pth, .safetensors or a checkpoint), or leave out_of_body.classifier.model empty to "
                "use the heuristic only."
            )
        if settings.num_classes > 1 and settings.out_of_body_class >= settings.num_classes:
            raise CurationError(
                f"curate: out_of_body.classifier.out_of_body_class={settings.out_of_body_class} is not a class of a "
                f"{settings.num_classes}-class model"
            )
        name = settings.model
        try:
            if name in BACKBONES and name != "timm":
                self.model = build_backbone(name, num_classes=settings.num_classes)
            else:
                self.model = build_backbone("timm", timm_name=name, num_classes=settings.num_classes)
            load_model_weights(self.model, path)
        except ValueError as e:
            raise CurationError(f"curate: out-of-body classifier {name} from {path}: {e}") from e
        self.model.eval()
        self.torch = torch
        self.identity = {
            "model": name,
            "weights": str(path),
            "sha256": sha256_file(path),
            "num_classes": settings.num_classes,
            "out_of_body_class": settings.out_of_body_class,
            "input_size": settings.input_size,
        }

    def _prepare(self, rgb: np.ndarray) -> np.ndarray:
        import cv2

        size = self.settings.input_size
        h, w = rgb.shape[:2]
        scale = size / min(h, w)
        resized = cv2.resize(
            rgb, (max(size, round(w * scale)), max(size, round(h * scale))), interpolation=cv2.INTER_AREA
        )
        top, left = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
        crop = resized[top : top + size, left : left + size].astype(np.float32) / 255.0
        mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
        return ((crop - mean) / std).transpose(2, 0, 1)

    def probabilities(self, frames: Sequence[np.ndarray]) -> list[float]:
        torch = self.torch
        if not frames:
            return []
        batch = torch.from_numpy(np.stack([self._prepare(f) for f in frames]))
        with torch.no_grad():
            logits = self.model(batch).float()
        if self.settings.num_classes == 1:
            p = torch.sigmoid(logits[:, 0])
        else:
            p = torch.softmax(logits, dim=1)[:, self.settings.out_of_body_class]
        return [float(v) for v in p]


# ------------------------------------------------------------------------------------------------------- scoring
def _shard_cache_path(out: Path, shard_file: str) -> Path:
    return out / "scores" / (shard_file.replace("/", "__") + ".json")


def _frame_identity(key: str, sample: Mapping[str, bytes]) -> tuple[str, int | None, float | None]:
    """(video, frame index, timestamp) from the frame's metadata, else from its key (``<video>/<frame>``)."""
    meta: dict[str, Any] = {}
    if "json" in sample:
        try:
            loaded = json.loads(sample["json"])
            meta = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            meta = {}
    video, _, last = key.rpartition("/")
    index = meta.get("frame_index")
    if not isinstance(index, int) or isinstance(index, bool):
        index = int(last) if last.isdigit() else None
    ts = meta.get("timestamp")
    return str(meta.get("video") or video), index, float(ts) if isinstance(ts, (int, float)) else None


def _score_shard(
    path: Path,
    expected: int,
    classifier: FrameClassifier | None,
) -> dict[str, Any]:
    """Stream one shard once: every frame's scores (or why it could not be read), and the classifier's output."""
    from surgenet_ssl.data.decode import decode_frame

    rows: list[dict[str, Any]] = []
    pending: list[tuple[dict[str, Any], np.ndarray]] = []
    damage = None

    def flush() -> None:
        if classifier is not None and pending:
            for (row, _), p in zip(pending, classifier.probabilities([f for _, f in pending]), strict=True):
                row["classifier"] = round(p, 4)
        pending.clear()

    counts = {"keys": 0}
    try:
        for ordinal, (key, sample) in enumerate(S.iter_shard(path, counts=counts)):
            video, index, ts = _frame_identity(key, sample)
            row: dict[str, Any] = {
                "ordinal": ordinal,
                "key": key,
                "video": video,
                "frame_index": index,
                "timestamp": ts,
            }
            try:
                if "jpg" not in sample:
                    raise ValueError("no .jpg member")
                rgb, _ = decode_frame(sample["jpg"])
                row.update(score_frame(rgb).as_row())
            except Exception as e:  # noqa: BLE001 - decoders raise many types on corrupt data
                row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                rows.append(row)
                continue
            rows.append(row)
            if classifier is not None:
                pending.append((row, rgb))
                if len(pending) >= classifier.settings.batch_size:
                    flush()
        flush()
    except (tarfile.TarError, OSError, EOFError) as e:  # a truncated or damaged tar: the frames before it count
        damage = f"{type(e).__name__}: {e}"
    if damage is None and len(rows) < expected:
        damage = f"the shard ends after {len(rows)} of {expected} frames"
    return {"frames": rows, "damage": damage}


def _cached_scores(cache: Path, sha256: str, classifier_id: Any) -> dict[str, Any] | None:
    try:
        obj = json.loads(cache.read_text())
    except (OSError, ValueError):
        return None
    ok = (
        isinstance(obj, dict)
        and obj.get("format") == SCORES_FORMAT
        and obj.get("version") == SCORES_VERSION
        and obj.get("sha256") == sha256
        and obj.get("classifier") == classifier_id
        and isinstance(obj.get("frames"), list)
    )
    return obj if ok else None


# ------------------------------------------------------------------------------------------------------ decisions
def _flags(row: Mapping[str, Any], s: CurationSettings, videos: VideoExclusion, frames: FrameExclusion) -> list[str]:
    """Every reason (but duplicate) that applies to a frame, in :data:`REASONS` order."""
    if "error" in row:
        return ["unreadable"]
    flags = []
    if videos and videos.match(str(row["video"])):
        flags.append("excluded_video")
    if frames and frames.match(str(row["key"])):
        flags.append("excluded_frame")
    if row["dark_fraction"] > s.dark.max_fraction:
        flags.append("dark")
    if row["entropy"] < s.low_information.min_entropy:
        flags.append("low_information")
    if row["sharpness"] < s.blur.min_sharpness:
        flags.append("blurry")
    if "classifier" in row:
        out_of_body = row["classifier"] >= s.out_of_body.classifier.threshold
    else:
        out_of_body = 1.0 - row["in_body"] > s.out_of_body.threshold
    if out_of_body:
        flags.append("out_of_body")
    return flags


def _order_in_video(row: Mapping[str, Any]) -> tuple[Any, ...]:
    index = row.get("frame_index")
    return (0, index, row["key"]) if isinstance(index, int) else (1, 0, row["key"])


def decide(rows: list[dict[str, Any]], s: CurationSettings, videos: VideoExclusion, frames: FrameExclusion) -> None:
    """Set ``flags``, ``reason`` and ``kept`` on every row; near-duplicates are looked for per video, in frame
    order, among the frames no other reason drops: a run of frames within ``max_hamming`` bits of its first frame
    keeps that first frame only (so a slow drift still ends a run)."""
    by_video: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        row["flags"] = _flags(row, s, videos, frames)
        row["duplicate_of"], row["hamming"] = "", ""
        by_video.setdefault(str(row["video"]), []).append(row)
    if s.duplicates.max_hamming >= 0:
        for video_rows in by_video.values():
            anchor: dict[str, Any] | None = None
            for row in sorted(video_rows, key=_order_in_video):
                if row["flags"]:
                    continue
                h = int(row["phash"], 16)
                if anchor is not None:
                    d = hamming(int(anchor["phash"], 16), h)
                    if d <= s.duplicates.max_hamming:
                        row["flags"] = ["duplicate"]
                        row["duplicate_of"], row["hamming"] = anchor["key"], d
                        continue
                anchor = row
    for row in rows:
        row["reason"] = row["flags"][0] if row["flags"] else ""
        row["kept"] = not row["flags"]


# --------------------------------------------------------------------------------------------------------- writing
CSV_COLUMNS = (
    "shard",
    "ordinal",
    "key",
    "video",
    "frame_index",
    "timestamp",
    "kept",
    "reason",
    "flags",
    "dark_fraction",
    "entropy",
    "sharpness",
    "out_of_body",
    "vignette",
    "tissue",
    "classifier",
    "phash",
    "duplicate_of",
    "hamming",
    "error",
)


def _csv_row(shard: str, row: Mapping[str, Any]) -> list[Any]:
    values = dict(row, shard=shard, kept=int(bool(row["kept"])), flags="+".join(row["flags"]))
    if "in_body" in row:
        values["out_of_body"] = round(1.0 - float(row["in_body"]), 4)
    return ["" if values.get(c) is None else values.get(c, "") for c in CSV_COLUMNS]


def _ranges(ordinals: Sequence[int]) -> list[list[int]]:
    """Sorted ordinals -> ``[[start, stop), ...]`` runs (a curated view of a million frames stays small)."""
    out: list[list[int]] = []
    for o in ordinals:
        if out and out[-1][1] == o:
            out[-1][1] = o + 1
        else:
            out.append([o, o + 1])
    return out


def _write_png(path: Path, image: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            image.save(f, format="PNG")


def _contact_sheet(
    directory: Path, picks: list[tuple[str, int, str, str]], title: str, columns: int = 8, thumb: int = 160
) -> Any:
    """A grid of the frames ``(shard file, ordinal, key, caption)``, each re-read from its shard by offset."""
    from PIL import Image, ImageDraw

    from surgenet_ssl.data.decode import decode_frame
    from surgenet_ssl.data.shard_index import load_index, read_members

    rows = max(1, math.ceil(len(picks) / columns))
    cell_h = thumb * 3 // 4 + 24
    sheet = Image.new("RGB", (columns * thumb, 20 + rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), title, fill=(0, 0, 0))
    indexes: dict[str, Any] = {}
    for n, (shard_file, ordinal, key, caption) in enumerate(picks):
        x, y = (n % columns) * thumb, 20 + (n // columns) * cell_h
        try:
            path = directory / shard_file
            if shard_file not in indexes:
                indexes[shard_file] = load_index(path)
            with open(path, "rb") as f:
                rgb, _ = decode_frame(read_members(f, indexes[shard_file], ordinal, ("jpg",))["jpg"])
            img = Image.fromarray(rgb)
            img.thumbnail((thumb - 4, thumb * 3 // 4 - 2))
            sheet.paste(img, (x + 2, y + 1))
        except Exception:  # noqa: BLE001 - an unreadable frame is shown as an empty cell with its key
            draw.rectangle((x + 2, y + 1, x + thumb - 2, y + thumb * 3 // 4 - 2), outline=(200, 0, 0))
        draw.text((x + 2, y + thumb * 3 // 4), key[-26:], fill=(0, 0, 0))
        draw.text((x + 2, y + thumb * 3 // 4 + 11), caption[:26], fill=(90, 90, 90))
    return sheet


_CAPTION: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "unreadable": lambda r: str(r.get("error", ""))[:26],
    "excluded_video": lambda r: "excluded video",
    "excluded_frame": lambda r: "excluded frame",
    "dark": lambda r: f"near-black {r['dark_fraction']:.2f}",
    "low_information": lambda r: f"entropy {r['entropy']:.2f}",
    "blurry": lambda r: f"sharpness {r['sharpness']:.1f}",
    "out_of_body": lambda r: (
        f"classifier {r['classifier']:.2f}" if "classifier" in r else f"out-of-body {1 - r['in_body']:.2f}"
    ),
    "duplicate": lambda r: f"{r['hamming']} bits from kept",
}


def _spread(items: list[Any], n: int) -> list[Any]:
    """``n`` items evenly spread over the list (all of them if it is shorter)."""
    if len(items) <= n:
        return items
    return [items[int(i * len(items) / n)] for i in range(n)]


# ------------------------------------------------------------------------------------------------------- pipeline
@dataclass
class CurationSummary:
    source: str
    directory: Path
    frames: int
    kept: int
    counts: dict[str, int]
    damaged_shards: list[str]
    rescored_shards: int
    seconds: float

    def line(self) -> str:
        dropped = ", ".join(f"{r} {n}" for r, n in self.counts.items() if n) or "none"
        return f"{self.source}: kept {self.kept} of {self.frames} frames; dropped: {dropped}"


def curate_source(
    directory: str | Path,
    settings: CurationSettings,
    videos: VideoExclusion | None = None,
    frames: FrameExclusion | None = None,
    classifier: FrameClassifier | None = None,
    rescore: bool = False,
    progress: bool = False,
) -> CurationSummary:
    """Score every frame of the prepared source in ``directory`` (scores of unchanged shards are reused unless
    ``rescore``), decide, and write the curated view, the CSV, the report and the contact sheets under
    ``<directory>/curation``. Nothing in the source itself is changed."""
    t0 = time.time()
    if L.is_url(directory):
        raise CurationError(
            f"curate: {directory} is a URL; curate the prepared directory where it was prepared (curation writes "
            "beside the shards), then upload it with its curation/ folder"
        )
    directory = Path(directory)
    try:
        manifest = S.read_manifest(directory)
    except S.ManifestError as e:
        raise CurationError(f"curate: {e}") from e
    if manifest.get("format") != S.MANIFEST_FORMAT:
        raise CurationError(f"curate: {directory} holds a collection manifest, not one prepared source")
    if not manifest.get("complete", False):
        raise CurationError(
            f"curate: prepare did not finish in {directory}; rerun the same prepare command, then curate"
        )
    source = str(manifest.get("source") or directory.name)
    videos, frames = videos or VideoExclusion(), frames or FrameExclusion()
    out = directory / CURATION_DIR
    classifier_id = classifier.identity if classifier is not None else None
    shard_rows: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    damaged: list[str] = []
    rescored = 0
    bar = _progress(len(manifest["shards"]), progress, source)
    for shard in manifest["shards"]:
        cache = _shard_cache_path(out, shard["file"])
        scored = None if rescore else _cached_scores(cache, shard["sha256"], classifier_id)
        if scored is None:
            result = _score_shard(directory / shard["file"], int(shard["frames"]), classifier)
            scored = {
                "format": SCORES_FORMAT,
                "version": SCORES_VERSION,
                "shard": shard["file"],
                "sha256": shard["sha256"],
                "classifier": classifier_id,
                **result,
            }
            with atomic_path(cache) as tmp:
                tmp.write_text(json.dumps(scored, separators=(",", ":")) + "\n")
            rescored += 1
        if scored.get("damage"):
            damaged.append(f"{shard['file']}: {scored['damage']}")
            log.warning(
                "%s: shard %s is damaged (%s); its unreadable frames are left out",
                source,
                shard["file"],
                scored["damage"],
            )
        shard_rows.append((shard, scored["frames"]))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    all_rows = [r for _, rows in shard_rows for r in rows]
    decide(all_rows, settings, videos, frames)
    missing = sum(max(0, int(sh["frames"]) - len(rows)) for sh, rows in shard_rows)  # past a shard's damage
    counts = {r: 0 for r in REASONS}
    for row in all_rows:
        if row["reason"]:
            counts[row["reason"]] += 1
    counts["unreadable"] += missing
    kept = sum(1 for r in all_rows if r["kept"])
    total = int(manifest["frames"])

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for shard, rows in shard_rows:
        for row in rows:
            writer.writerow(_csv_row(shard["file"], row))
    with atomic_path(out / "frames.csv") as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")

    sheets: dict[str, str] = {}
    for reason in REASONS:
        name = f"dropped_{reason}.png"
        (out / name).unlink(missing_ok=True)  # a sheet of an earlier run with other thresholds would mislead
        dropped = [(sh["file"], r) for sh, rows in shard_rows for r in rows if r["reason"] == reason]
        if not dropped or settings.contact_sheet_frames == 0:
            continue
        picks = [
            (f, r["ordinal"], r["key"], _CAPTION[reason](r)) for f, r in _spread(dropped, settings.contact_sheet_frames)
        ]
        title = f"{source}: {len(dropped)} frames dropped as {reason} ({len(picks)} shown)"
        _write_png(out / name, _contact_sheet(directory, picks, title))
        sheets[reason] = name

    exclusions = {
        "videos": videos.to_dict()
        | {"matched": sorted({str(r["video"]) for r in all_rows if "excluded_video" in r["flags"]})},
        "frames": frames.to_dict() | {"matched": sum(1 for r in all_rows if "excluded_frame" in r["flags"])},
    }
    report = {
        "source": source,
        "frames": total,
        "kept": kept,
        "dropped": counts,
        "damaged_shards": damaged,
        "thresholds": settings.thresholds(),
        "classifier": classifier_id,
        "exclusions": exclusions,
        "contact_sheets": sheets,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    S.write_json_atomic(out / "report.json", report)
    view = {
        "format": VIEW_FORMAT,
        "version": VIEW_VERSION,
        **{k: report[k] for k in ("source", "frames", "kept", "dropped", "thresholds", "classifier", "exclusions")},
        "scores_version": SCORES_VERSION,
        "shards": [
            {
                "file": sh["file"],
                "sha256": sh["sha256"],
                "frames": int(sh["frames"]),
                "kept": _ranges([r["ordinal"] for r in rows if r["kept"]]),
            }
            for sh, rows in shard_rows
        ],
        "created": report["created"],
        "tool": "surgenet-ssl",
    }
    S.write_json_atomic(out / VIEW_NAME, view)  # last: the view is what training reads
    return CurationSummary(source, directory, total, kept, counts, damaged, rescored, time.time() - t0)


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"curate {desc}", unit="shard")


# ------------------------------------------------------------------------------------------------------- reading
def _view_error(where: str, what: str) -> CurationError:
    return CurationError(
        f"{where}: {what}. Rerun `python -m surgenet_ssl.curate path=<the prepared source>` to rebuild the curated "
        "view, or train without dataset.curated."
    )


def read_curated_view(directory: L.Location, shards: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The curated view of a prepared source (local or URL), checked against the manifest's ``shards``.

    Returns ``{"kept": {shard file: sorted int64 ordinals}, "frames": kept frames of these shards, "summary": what
    the model card records}``. A missing view, one that breaks its schema, or one older than the shards (a shard
    prepared or re-prepared since: its sha256 differs) is a :class:`CurationError` naming the file and the fix."""
    where = str(L.join(directory, f"{CURATION_DIR}/{VIEW_NAME}", trusted=True))
    try:
        view = json.loads(L.read_bytes(where, max_bytes=MAX_MANIFEST_BYTES))
    except FileNotFoundError:
        raise CurationError(
            f"dataset.curated=true but {where} does not exist: curate the source first with `python -m "
            "surgenet_ssl.curate path=<the prepared source>` (or train without dataset.curated)"
        ) from None
    except (OSError, ValueError) as e:
        raise _view_error(where, f"cannot be read ({e})") from e
    if not isinstance(view, dict) or view.get("format") != VIEW_FORMAT or view.get("version") != VIEW_VERSION:
        raise _view_error(where, "is not a curated view of this version")
    entries = view.get("shards")
    if not isinstance(entries, list):
        raise _view_error(where, "shards is not a list")
    by_file: dict[tuple[str, str], np.ndarray] = {}
    for i, entry in enumerate(entries):
        ok = isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("sha256"), str)
        runs = entry.get("kept") if ok else None
        n = entry.get("frames") if ok else None
        if not ok or not isinstance(runs, list) or not isinstance(n, int) or n < 0:
            raise _view_error(where, f"shards[{i}] is not {{file, sha256, frames, kept}}")
        parts = []
        for run in runs:
            if (
                not isinstance(run, list)
                or len(run) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in run)
                or not 0 <= run[0] < run[1] <= n
            ):
                raise _view_error(where, f"shards[{i}].kept holds {str(run)[:40]}, not a run [start, stop) of 0..{n}")
            parts.append(np.arange(run[0], run[1], dtype=np.int64))
        by_file[(entry["file"], entry["sha256"])] = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    kept: dict[str, np.ndarray] = {}
    stale = []
    for shard in shards:
        ordinals = by_file.get((str(shard.get("file")), str(shard.get("sha256"))))
        if ordinals is None:
            stale.append(str(shard.get("file")))
        else:
            kept[str(shard["file"])] = ordinals
    if stale:
        raise _view_error(
            where,
            f"it is older than the source's shards: {len(stale)} shards were prepared or re-prepared since "
            f"({', '.join(stale[:3])}{' ...' if len(stale) > 3 else ''})",
        )
    summary = {
        k: view.get(k) for k in ("frames", "kept", "dropped", "thresholds", "classifier", "exclusions", "created")
    }
    return {"kept": kept, "frames": int(sum(len(v) for v in kept.values())), "summary": summary}


def iter_rows(csv_path: Path) -> Iterator[dict[str, str]]:
    """The rows of a ``frames.csv`` (for scripts and tests)."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        yield from csv.DictReader(f)

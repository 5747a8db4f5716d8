"""Resolve a ``dataset`` config into prepared sources with sampling weights, reading manifests only.

Config schema (surgenet_ssl/configs/dataset/*.yaml)::

    name: cholec                 # used in run and export names
    sources:                     # source -> sampling weight; null = proportional to its frames
      cholec80: null             #   or {weight: 2.0, path: /elsewhere/cholec80}
      heichole: null
    fraction: 1.0                # deterministic per-frame subsample (hash of the frame key), for ablations
    allow_missing: false         # true: train on the prepared sources, log the missing ones
    root: null                   # where <source>/manifest.json live; null = paths.data_root
    path: null                   # dataset=custom: one prepared directory (or a folder of them)
    generate: null               # "demo": build the embedded demo data under `root` on first use
    exclude_videos: null         # leakage guard: videos left out of every source (see data/video_exclusion.py)
    curated: false               # true: train on each source's curated view (python -m surgenet_ssl.curate)

``sources: null`` means "every prepared source found under ``path``/``root``" (used by custom and demo).
A key outside this schema (top level or in a source's mapping) is an error naming the closest valid key.
Start-up cost is one JSON file per source, independent of the number of frames.

``root``, ``path`` and per-source ``path`` may be URLs (``http(s)://``, ``s3://``, ``gs://``, ``pipe:``; see
surgenet_ssl.data.location). A remote folder cannot be listed, so with ``sources: null`` a URL must hold a
manifest.json itself: one prepared source, or a collection manifest naming its sources.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from surgenet_ssl.config.checks import check_keys
from surgenet_ssl.data import location as L
from surgenet_ssl.data import shards as S
from surgenet_ssl.data.sources import SOURCES, canonical_source_name
from surgenet_ssl.data.video_exclusion import VideoExclusion, load_video_exclusion

__all__ = [
    "SourceSpec",
    "MissingSource",
    "ResolvedMixture",
    "MissingSourcesError",
    "resolve_mixture",
    "check_dataset_config",
    "check_source_dir",
]

log = logging.getLogger(__name__)

_KNOWN_KEYS = {
    "name",
    "sources",
    "fraction",
    "allow_missing",
    "root",
    "path",
    "generate",
    "description",
    "exclude_videos",
    "curated",
}
_SOURCE_KEYS = {"weight", "path"}  # dataset.sources.<name>: a weight, null, or {weight: 2.0, path: DIR}


class MissingSourcesError(FileNotFoundError):
    """Sources of the chosen mixture are not prepared (the message lists each one and how to prepare it)."""


@dataclass
class SourceSpec:
    """A prepared source ready for streaming: its shards (relative to ``directory``) and frame counts."""

    name: str
    directory: L.Location  # a local Path or a URL string
    shards: list[dict[str, Any]]
    frames: int  # frames listed in the manifest
    expected_frames: int  # after the mixture's fraction (what an epoch counts)
    weight: float  # sampling probability (normalised over present sources)
    procedure: str = "unknown"
    excluded_videos: list[str] = field(default_factory=list)  # left out by dataset.exclude_videos
    # dataset.curated: per shard file, the ordinals of the frames the curated view keeps (None: every frame)
    kept: dict[str, np.ndarray] | None = None
    curation: dict[str, Any] | None = None  # the curated view's summary (thresholds, counts, exclusions)
    sample_fps: float | None = None  # frames per second of video that prepare kept (consecutive frames' spacing)
    frame_sizes: dict[str, int] | None = None  # "WxH" -> frames, as prepare recorded them (None: not recorded)


@dataclass
class MissingSource:
    name: str
    expected: L.Location
    problem: str  # "not prepared", "prepare not finished", ...
    hint: str


@dataclass
class ResolvedMixture:
    name: str
    fraction: float
    sources: list[SourceSpec]
    missing: list[MissingSource] = field(default_factory=list)
    weighted: bool = False  # weights were given (False: proportional to frames, i.e. every frame once per epoch)

    @property
    def total_frames(self) -> int:
        return sum(s.expected_frames for s in self.sources)


def _plain(cfg: Any) -> Any:
    """DictConfig/ListConfig -> plain containers (interpolations resolved); plain objects pass through."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(cfg, Mapping):
        return {k: _plain(v) for k, v in cfg.items()}
    return cfg


def _prepare_hint(name: str, directory: L.Location) -> str:
    src = SOURCES.get(canonical_source_name(name) or "")
    what = src.display if src else name
    kind = "videos or frame folders"
    if src is not None:
        kind = "videos" if src.distributed_as == "video" else "frame/image folders"
        if not src.public:
            kind += "; private dataset, available at its owner's site only"
    output = f"/path/to/prepared/{name}" if L.is_url(directory) else directory
    hint = f"python -m surgenet_ssl.prepare source={name} input=/path/to/{what.split()[0]} output={output}"
    if L.is_url(directory):
        hint += f", then upload that directory to {directory}"
    return f"{hint}   ({what}: {kind})"


def check_source_dir(name: str, directory: L.Location) -> tuple[dict[str, Any] | None, MissingSource | None]:
    """Load a source manifest (local or remote), or describe why it cannot be used."""
    manifest_path = L.join(directory, S.MANIFEST_NAME)
    hint = _prepare_hint(name, directory)
    if L.is_url(directory):
        try:
            manifest = S.read_manifest(directory)
        except S.ManifestSchemaError:
            raise  # a manifest that breaks the rules is never "not prepared": the run stops, naming the field
        except S.ManifestError as e:
            cause = e.__cause__
            if isinstance(cause, FileNotFoundError):
                problem = f"not prepared (no manifest.json at {manifest_path}: {getattr(cause, 'reason', cause)})"
            elif isinstance(cause, OSError):
                problem = f"cannot read {manifest_path} ({getattr(cause, 'reason', cause)})"
            else:
                problem = f"unusable manifest: {e}"
            return None, MissingSource(name, manifest_path, problem, hint)
    else:
        directory = Path(directory)
        manifest_path = directory / S.MANIFEST_NAME
        if not directory.exists():
            return None, MissingSource(name, manifest_path, "not prepared (directory missing)", hint)
        try:
            manifest = S.read_manifest(directory)
        except S.ManifestSchemaError:
            raise
        except S.ManifestError as e:
            problem = "not prepared (no manifest.json)" if not manifest_path.exists() else f"unusable manifest: {e}"
            if not manifest_path.exists() and (directory / ".state").is_dir():
                problem = "prepare was interrupted before writing its manifest; rerun the same prepare command"
            return None, MissingSource(name, manifest_path, problem, hint)
    if manifest.get("format") != S.MANIFEST_FORMAT:
        return None, MissingSource(name, manifest_path, "is a collection of sources, not one source", hint)
    if not manifest.get("complete", False):
        pending = manifest.get("pending", "?")
        return None, MissingSource(
            name,
            manifest_path,
            f"prepare did not finish ({pending} of {manifest.get('inputs', '?')} inputs pending); rerun the same "
            "prepare command to finish it (finished videos are kept)",
            hint,
        )
    if int(manifest.get("frames", 0)) <= 0 or not manifest.get("shards"):
        return None, MissingSource(name, manifest_path, "prepared but holds no frames (see its 'skipped' list)", hint)
    if manifest.get("source") not in (None, name):
        log.info("source %r in config uses %s, prepared as source %r", name, directory, manifest.get("source"))
    return manifest, None


def _discover(base: L.Location) -> tuple[dict[str, L.Location], str | None]:
    """Prepared sources under ``base``: itself, a collection manifest's members, or subfolders with manifests
    (local only: a remote folder cannot be listed). Also returns why ``base``'s own manifest could not be read."""
    try:
        manifest, why = S.read_manifest(base), None
    except S.ManifestSchemaError:
        raise
    except S.ManifestError as e:
        manifest, why = None, str(e)
    if manifest is not None and manifest.get("format") == S.MANIFEST_FORMAT:
        return {str(manifest.get("source") or L.basename(base)): base}, None
    if manifest is not None:  # collection
        return {name: L.join(base, rel) for name, rel in manifest.get("sources", {}).items()}, None
    if not L.is_url(base) and Path(base).is_dir():
        return {p.name: p for p in sorted(Path(base).iterdir()) if (p / S.MANIFEST_NAME).is_file()}, why
    return {}, why


def check_dataset_config(dataset_cfg: Mapping[str, Any]) -> None:
    """The checks of a dataset config that need no data and no torch (keys, fraction, a custom dataset without a
    path): the training entry point runs them first, so that such a mistake fails in a second, not after start-up."""
    cfg = _plain(dataset_cfg)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"dataset config must be a mapping, got {type(cfg).__name__}")
    check_keys(cfg, _KNOWN_KEYS, "dataset")  # a misspelt key fails, naming the closest valid one
    fraction = float(cfg.get("fraction", 1.0) if cfg.get("fraction") is not None else 1.0)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"dataset.fraction must be in (0, 1], got {fraction}")
    name = str(cfg.get("name") or "custom")
    if cfg.get("path") == "???" or (name == "custom" and not cfg.get("path") and not cfg.get("sources")):
        raise ValueError(
            "dataset=custom needs dataset.path=DIR: a directory prepared by `python -m surgenet_ssl.prepare` "
            "(it holds manifest.json) or a folder of such directories."
        )
    load_video_exclusion(cfg.get("exclude_videos"))  # a list file that is not there fails now, named
    if cfg.get("generate") and cfg["generate"] != "demo":
        raise ValueError(f"dataset.generate must be 'demo' or null, got {cfg['generate']!r}")
    locations = {f"dataset.{k}": cfg.get(k) for k in ("path", "root")}
    if isinstance(cfg.get("sources"), Mapping):
        for n, entry in cfg["sources"].items():
            if isinstance(entry, Mapping):
                locations[f"dataset.sources.{n}.path"] = entry.get("path")
    for key, value in locations.items():
        if value not in (None, "", "???"):
            try:
                L.as_location(str(value))  # an unreadable URL scheme (ftp://, a typo) fails here, named
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None


def resolve_mixture(dataset_cfg: Mapping[str, Any], data_root: str | Path) -> ResolvedMixture:
    """Turn a dataset config into prepared sources with weights. Raises :class:`MissingSourcesError` (every
    missing source, where it was expected and how to prepare it) unless ``allow_missing`` is true."""
    check_dataset_config(dataset_cfg)
    cfg = _plain(dataset_cfg)
    name = str(cfg.get("name") or "custom")
    fraction = float(cfg.get("fraction", 1.0) if cfg.get("fraction") is not None else 1.0)
    allow_missing = bool(cfg.get("allow_missing", False))

    if cfg.get("generate"):
        from surgenet_ssl.data.demo import ensure_demo_dataset

        base: L.Location = ensure_demo_dataset(cfg.get("root") or data_root)
    elif cfg.get("path"):
        base = L.as_location(str(cfg["path"]))
    else:
        base = L.as_location(str(cfg.get("root") or data_root))

    entries = cfg.get("sources")
    if not entries:
        found, why = _discover(base)
        if not found:
            raise MissingSourcesError(_no_sources_message(base, why))
        entries = {n: None for n in found}
        dirs = found
    else:
        if isinstance(entries, (list, tuple)):
            entries = {str(n): None for n in entries}
        dirs = {}
        for n, entry in entries.items():
            if isinstance(entry, Mapping):
                check_keys(entry, _SOURCE_KEYS, f"dataset.sources.{n}")
            path = entry.get("path") if isinstance(entry, Mapping) else None
            dirs[n] = L.as_location(str(path)) if path else L.join(base, n, trusted=True)  # n: the user's config

    weights: dict[str, float | None] = {}
    for n, entry in entries.items():
        w = entry.get("weight") if isinstance(entry, Mapping) else entry
        if w is not None and (not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0):
            raise ValueError(f"dataset.sources.{n}: the weight must be a number >= 0 or null, got {w!r}")
        weights[n] = None if w is None else float(w)
    given = [n for n, w in weights.items() if w is not None]
    if given and len(given) != len(weights):
        raise ValueError(
            f"dataset.sources: give a sampling weight to every source or to none (null = proportional to frames). "
            f"Weighted: {given}; unweighted: {[n for n, w in weights.items() if w is None]}."
        )

    exclusion = load_video_exclusion(cfg.get("exclude_videos"))
    curated = bool(cfg.get("curated", False))
    present: list[SourceSpec] = []
    missing: list[MissingSource] = []
    for n in entries:
        if weights[n] == 0.0:
            continue
        manifest, problem = check_source_dir(n, dirs[n])
        if problem is not None:
            missing.append(problem)
            continue
        assert manifest is not None
        shards, left_out = _without_videos(n, list(manifest["shards"]), exclusion)
        frames = sum(int(sh.get("frames", 0)) for sh in shards) if left_out else int(manifest["frames"])
        kept, curation = None, None
        if curated:
            from surgenet_ssl.data.curation import read_curated_view

            view = read_curated_view(dirs[n], shards)
            kept, curation, frames = view["kept"], view["summary"], view["frames"]
            log.info(
                "source %s: curated view keeps %d of its %d frames (%s)",
                n,
                frames,
                sum(int(sh.get("frames", 0)) for sh in shards),
                ", ".join(f"{r} {c}" for r, c in (curation.get("dropped") or {}).items() if c) or "none dropped",
            )
        fps = (manifest.get("settings") or {}).get("fps")
        present.append(
            SourceSpec(
                name=n,
                directory=dirs[n],
                shards=shards,
                excluded_videos=left_out,
                frames=frames,
                expected_frames=int(round(frames * fraction)),
                weight=0.0,
                procedure=str(manifest.get("procedure", "unknown")),
                kept=kept,
                curation=curation,
                sample_fps=float(fps)
                if isinstance(fps, (int, float)) and not isinstance(fps, bool) and fps > 0
                else None,
                frame_sizes=manifest.get("frame_sizes"),
            )
        )

    if missing and (not allow_missing or not present):
        raise MissingSourcesError(_missing_message(name, base, missing, len(entries), bool(present)))
    if missing:
        log.warning(
            "dataset %s: training on %d of %d sources; missing (dataset.allow_missing=true): %s",
            name,
            len(present),
            len(entries),
            ", ".join(f"{m.name} ({m.problem})" for m in missing),
        )

    # every source has a weight, or none has (checked above): none -> proportional to the frames
    raw = [float(s.expected_frames) if (w := weights[s.name]) is None else w for s in present]
    total = sum(raw)
    if total <= 0:
        raise ValueError(f"dataset {name}: all sampling weights are zero (or the sources have no frames).")
    for s, w in zip(present, raw, strict=True):
        s.weight = w / total
        if s.expected_frames == 0:
            log.warning("source %s: %d frames x fraction %g rounds to 0 frames", s.name, s.frames, fraction)
    return ResolvedMixture(name=name, fraction=fraction, sources=present, missing=missing, weighted=bool(given))


def _without_videos(
    source: str, shards: list[dict[str, Any]], exclusion: VideoExclusion
) -> tuple[list[dict[str, Any]], list[str]]:
    """A source's shards without those of excluded videos (each shard holds one video), and the videos left out."""
    if not exclusion:
        return shards, []
    kept = [sh for sh in shards if not exclusion.match(str(sh.get("video", "")))]
    left_out = sorted({str(sh.get("video")) for sh in shards} - {str(sh.get("video")) for sh in kept})
    if left_out:
        frames = sum(int(sh.get("frames", 0)) for sh in shards) - sum(int(sh.get("frames", 0)) for sh in kept)
        log.info(
            "source %s: dataset.exclude_videos leaves out %d videos (%d frames): %s",
            source,
            len(left_out),
            frames,
            ", ".join(left_out[:20]) + (" ..." if len(left_out) > 20 else ""),
        )
    return kept, left_out


def _no_sources_message(base: L.Location, why: str | None = None) -> str:
    if L.is_url(base):
        return (
            f"No prepared source found at {base}: {why or 'no manifest.json'}. A remote dataset.path (or root) must "
            "hold a manifest.json: one prepared source, or a collection manifest listing its sources (remote folders "
            "cannot be listed). Check the URL, or name the sources with dataset.sources."
        )
    base = Path(base)
    if why and (base / S.MANIFEST_NAME).is_file():  # there is one, but damaged (a half-written copy, a disk error)
        return f"The prepared source in {base} cannot be used: {why}"
    msg = f"No prepared source (manifest.json) found in {base}."
    if base.is_dir():
        from surgenet_ssl.data.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

        raw = [p for p in base.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS][:1]
        if raw:
            msg += (
                f" It holds raw videos/images (e.g. {raw[0]}); prepare them first: python -m surgenet_ssl.prepare "
                f"source=NAME input={base} output=/path/to/prepared/NAME, then dataset.path=/path/to/prepared/NAME."
            )
    else:
        msg += " The directory does not exist."
    return msg


def _missing_message(name: str, base: L.Location, missing: list[MissingSource], n_total: int, any_present: bool) -> str:
    lines = [f"dataset={name}: {len(missing)} of {n_total} sources cannot be used (looked under {base}):"]
    for m in missing:
        lines.append(f"  - {m.name}: {m.problem}")
        lines.append(f"      expected: {m.expected}")
        lines.append(f"      prepare:  {m.hint}")
    lines.append("Fix: prepare them (commands above), or point paths.data_root=DIR (env SURGENET_DATA_ROOT) at the")
    lines.append(
        "folder that holds the prepared sources"
        + (", or set dataset.allow_missing=true to train on the sources that are present." if any_present else ".")
    )
    lines.append("`python -m surgenet_ssl.datasets` lists what is prepared under paths.data_root.")
    return "\n".join(lines)

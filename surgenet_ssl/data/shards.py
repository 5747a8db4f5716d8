"""WebDataset tar shards and the per-source ``manifest.json``: the on-disk contract between prepare and the loader.

Layout of one prepared source directory::

    <data_root>/<source>/manifest.json          what the loader reads (shards, frame counts, sha256, settings)
    <data_root>/<source>/shards/<video>-00000.tar   WebDataset tar: <key>.jpg + <key>.json per frame
    <data_root>/<source>/shards/<video>-00000.tar.idx.json   its index (byte offsets of the members; optional)
    <data_root>/<source>/.state/<video>.json     per-video completion records (resumability; not read by the loader)

The loader also reads such a directory from a URL (``http(s)://``, ``s3://``, ``gs://``, ``pipe:``; see
surgenet_ssl.data.location): the manifest and the shards, never ``.state``.

Why these choices:
- Shards are written under a temporary name and renamed only when complete, and the manifest lists only shards
  of finished videos, so a killed prepare never exposes a partial shard.
- Tar members have fixed metadata (mtime 0, uid 0, mode 0444) so the same input gives byte-identical shards and
  checksums on every machine.
- Keys are ``<video id>/<frame index>`` (or ``<folder>/<image stem>``): derived from names and timestamps, never
  from directory listing order, so the same frame has the same key everywhere. Keys contain no dots (WebDataset
  splits key and extension at the first dot of the file name).
- Subsampling (``small``, ``fraction`` ablations) keeps a frame iff a hash of ``<source>/<key>`` is below the
  fraction: deterministic, machine independent and nested (the 10% frames are inside the 25% frames).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgenet_ssl.data import location as L
from surgenet_ssl.data.manifest_schema import MAX_MANIFEST_BYTES, ManifestError, ManifestSchemaError, validate_manifest
from surgenet_ssl.data.shard_index import write_index
from surgenet_ssl.runtime.io_utils import atomic_path, sha256_file

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "ManifestError",
    "ManifestSchemaError",
    "ShardInfo",
    "ShardWriter",
    "iter_shard",
    "keep_frame",
    "sanitize_id",
    "flat_name",
    "sha256_file",
    "read_manifest",
    "write_json_atomic",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "surgenet-ssl/source-shards"
COLLECTION_FORMAT = "surgenet-ssl/collection"
MANIFEST_VERSION = 1
_SUBSAMPLE_SALT = b"surgenet-ssl/subsample/v1"


# ----------------------------------------------------------------------------------------------------------- keys
_BAD_ID_CHARS = re.compile(r"[^A-Za-z0-9_\-/]")


def sanitize_id(text: str) -> str:
    """Make a path-like name safe inside a WebDataset key: only ``A-Za-z0-9_-/``, no empty parts."""
    text = text.replace(os.sep, "/").replace("\\", "/")
    parts = [_BAD_ID_CHARS.sub("_", p) for p in text.split("/") if p not in ("", ".")]
    return "/".join(parts) or "_"


def flat_name(video_id: str, max_len: int = 120) -> str:
    """A file-name-safe, flat version of a video id (``a/b`` -> ``a__b``): it names the video's shards and record.

    One-to-one, so two videos never share a shard or state file: an id whose flat form does not read back to it
    (``a__b`` and ``a/b`` both flatten to ``a__b``; ``a_/b`` and ``a/_b`` to ``a___b``) gets a hash of the id
    appended, as does a long one (shortened). The same id always gets the same name, whatever else is prepared.
    """
    flat = video_id.replace("/", "__")
    if flat.replace("__", "/") != video_id or len(flat) > max_len:
        digest = hashlib.sha1(video_id.encode()).hexdigest()[:10]
        flat = f"{flat[: max_len - 11]}-{digest}"
    return flat


def keep_frame(source: str, key: str, fraction: float) -> bool:
    """True iff the frame ``<source>/<key>`` belongs to the deterministic ``fraction`` subsample."""
    if fraction >= 1.0:
        return True
    if fraction <= 0.0:
        return False
    digest = hashlib.blake2b(f"{source}/{key}".encode(), digest_size=8, key=_SUBSAMPLE_SALT).digest()
    return int.from_bytes(digest, "big") < fraction * 2.0**64


# --------------------------------------------------------------------------------------------------------- writing
@dataclass
class ShardInfo:
    """One finished shard as listed in the manifest (``file`` is relative to the source directory)."""

    file: str
    frames: int
    bytes: int
    sha256: str
    video: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "frames": self.frames,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "video": self.video,
        }


@dataclass
class ShardWriter:
    """Write frames of one video into ``<prefix>-00000.tar, -00001.tar, ...`` of at most ``max_frames`` frames.

    Each shard is written to a hidden temporary file and renamed when complete; ``close()`` returns the
    finished shards. Nothing partial ever carries the final name.
    """

    root: Path  # the source directory
    prefix: str  # relative to root, e.g. "shards/video01"
    video: str
    max_frames: int = 1000
    finished: list[ShardInfo] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_frames < 1:
            raise ValueError(f"shard_max_frames must be >= 1, got {self.max_frames}")
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0

    def _open(self) -> None:
        final = self.root / f"{self.prefix}-{len(self.finished):05d}.tar"
        final.parent.mkdir(parents=True, exist_ok=True)
        self._final = final
        self._tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)
        self._count = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample: ``members`` maps extension (``jpg``, ``json``) to bytes."""
        if "." in key.rsplit("/", 1)[-1]:
            raise ValueError(f"WebDataset keys must not contain '.' in their last part: {key!r}")
        if self._tar is None:
            self._open()
        assert self._tar is not None
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o444, 0, 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        if self._count >= self.max_frames:
            self._finish()

    def _finish(self) -> None:
        if self._tar is None:
            return
        assert self._tmp is not None
        self._tar.close()
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        final = self._final
        os.replace(self._tmp, final)
        write_index(final)  # <shard>.idx.json: where each frame is, for the loader's random access
        self.finished.append(
            ShardInfo(
                file=final.relative_to(self.root).as_posix(),
                frames=self._count,
                bytes=final.stat().st_size,
                sha256=sha256_file(final),
                video=self.video,
            )
        )
        self._tar, self._tmp, self._count = None, None, 0

    def close(self) -> list[ShardInfo]:
        self._finish()
        return self.finished

    def abort(self) -> None:
        """Drop the shard in progress (e.g. the video failed); finished shards stay on disk."""
        if self._tar is not None:
            self._tar.close()
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()
        self._tar, self._tmp = None, None


# --------------------------------------------------------------------------------------------------------- reading
def _split_name(name: str) -> tuple[str, str]:
    """``a/b/00000012.jpg`` -> (``a/b/00000012``, ``jpg``): WebDataset's rule (extension after the first dot)."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


def iter_shard(
    path: str | Path,
    keep: Any = None,
    extensions: tuple[str, ...] = ("jpg", "json"),
    counts: dict[str, int] | None = None,
    cache_dir: str | Path | None = None,
    size: int | None = None,
    sha256: str | None = None,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` samples of one tar shard in file order.

    ``keep(key) -> bool`` filters samples *before* their data is read: skipped members are seeked over, so a 10%
    subsample reads about 10% of the bytes. ``counts["keys"]`` is incremented for every key seen (kept or not), so
    the caller can compare it with the manifest: Python's tarfile ends *silently* when a tar is cut at a member
    boundary. Raises ``tarfile.ReadError``/``OSError``/``EOFError`` on a truncated or corrupt tar *after* yielding
    the samples before the damage (the caller counts and logs it).

    ``path`` may be a URL (see :mod:`surgenet_ssl.data.location`): the shard is streamed (skipped members are
    read and dropped), a 404 raises ``FileNotFoundError`` and a cut transfer ``OSError`` after the samples before
    the cut. With ``cache_dir`` a
    completely read remote shard is kept there (checked against ``size``/``sha256``) and later reads use the copy.
    """
    counts = counts if counts is not None else {}
    counts.setdefault("keys", 0)
    if not L.is_url(path):
        with tarfile.open(path, "r:") as tar:
            yield from _iter_tar(tar, keep, extensions, counts)
        return
    url = str(path)
    cached = L.cache_file(cache_dir, url, sha256) if cache_dir is not None else None
    if cached is not None and cached.is_file():
        with tarfile.open(cached, "r:") as tar:
            yield from _iter_tar(tar, keep, extensions, counts)
        return
    stream = L.RemoteStream(url, tee_to=cached, size=size, sha256=sha256)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]  # a read()-only stream
            yield from _iter_tar(tar, keep, extensions, counts)
        stream.finish()  # the tar padding, the tool's exit status, and the cached copy
    finally:
        stream.close()


def _iter_tar(
    tar: tarfile.TarFile, keep: Any, extensions: tuple[str, ...], counts: dict[str, int]
) -> Iterator[tuple[str, dict[str, bytes]]]:
    key: str | None = None
    sample: dict[str, bytes] = {}
    skip_key: str | None = None
    while True:
        info = tar.next()
        if info is None:
            break
        if not info.isfile():
            continue
        k, ext = _split_name(info.name)
        if k == skip_key:
            continue
        if k != key:
            if key is not None and sample:
                yield key, sample
            key, sample = k, {}
            counts["keys"] += 1
            if keep is not None and not keep(k):
                skip_key, key = k, None
                continue
            skip_key = None
        if ext in extensions:
            f = tar.extractfile(info)
            assert f is not None
            data = f.read()
            if len(data) != info.size:
                raise tarfile.ReadError(f"unexpected end of data in member {info.name}")
            sample[ext] = data
    if key is not None and sample:
        yield key, sample


# -------------------------------------------------------------------------------------------------------- manifest
def write_json_atomic(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Load and validate ``<directory>/manifest.json`` (a source manifest or a collection of sources).

    ``directory`` may be a URL; a remote manifest that cannot be fetched raises :class:`ManifestError` whose
    ``__cause__`` is the ``FileNotFoundError`` (404, missing object) or ``OSError`` of the transfer.
    """
    if L.is_url(directory):
        url = str(L.join(directory, MANIFEST_NAME))
        try:
            text = L.read_bytes(url, max_bytes=MAX_MANIFEST_BYTES).decode("utf-8", errors="replace")
        except FileNotFoundError as e:
            raise ManifestError(f"No {MANIFEST_NAME} at {url} ({getattr(e, 'reason', e)})") from e
        except OSError as e:
            raise ManifestError(f"Cannot read {url} ({getattr(e, 'reason', e)})") from e
        try:
            manifest = json.loads(text)
        except ValueError as e:
            raise ManifestError(
                f"{url} is not a JSON manifest ({e}); check that the URL serves the manifest.json written by "
                "`python -m surgenet_ssl.prepare`."
            ) from e
        return _check_manifest(manifest, url)
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"No {MANIFEST_NAME} in {directory}")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes, more than any manifest ({MAX_MANIFEST_BYTES} at most)")
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ManifestError(
            f"Cannot read {path}: {e}. The file is damaged; rerun `python -m surgenet_ssl.prepare` for this source "
            "(finished videos are kept and the manifest is rebuilt)."
        ) from e
    return _check_manifest(manifest, path)


def _check_manifest(manifest: Any, path: str | Path) -> dict[str, Any]:
    version = manifest.get("version") if isinstance(manifest, dict) else None
    if isinstance(version, int) and version > MANIFEST_VERSION:
        raise ManifestError(
            f"{path} has manifest version {manifest.get('version')}, newer than this surgenet-ssl understands "
            f"({MANIFEST_VERSION}). Update surgenet-ssl."
        )
    if not isinstance(manifest, dict) or manifest.get("format") not in (MANIFEST_FORMAT, COLLECTION_FORMAT):
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise ManifestError(f"{path} is not a surgenet-ssl manifest (format={fmt!r}, expected {MANIFEST_FORMAT!r}).")
    formats = {MANIFEST_FORMAT: "source", COLLECTION_FORMAT: "collection"}
    return validate_manifest(manifest, str(path), formats, MANIFEST_VERSION)

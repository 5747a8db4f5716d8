"""The schema of ``manifest.json`` files, checked before anything in them is used.

Why: a manifest can come from elsewhere (a collaborator's bucket, a lab's HTTP server), so it is data to check,
not code to trust. Every field the loader, the k-NN monitor and ``datasets`` read is checked for its type and
range, and every name that becomes a path or URL passes :func:`surgenet_ssl.data.location.check_manifest_name`.
A bad manifest fails at start with one message naming the file, the field (``shards[3].file``), the value and the
rule, instead of a ``KeyError``/``TypeError`` deep in a loader worker. Fields this version does not read are left
alone (newer writers may add some).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from surgenet_ssl.data import location as L

__all__ = ["ManifestError", "ManifestSchemaError", "MAX_MANIFEST_BYTES", "validate_manifest"]

MAX_MANIFEST_BYTES = 256 << 20  # ~1,000x the manifest of a 4.7 M-frame source: more is not a manifest of ours
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FRAME_SIZE = re.compile(r"[1-9][0-9]{0,5}x[1-9][0-9]{0,5}")


class ManifestError(RuntimeError):
    """A manifest.json is missing, unreadable or not one of ours."""


class ManifestSchemaError(ManifestError, ValueError):
    """A manifest breaks the schema: the message names the file, the field and what is expected. Unlike a missing
    manifest, this is never taken for "source not prepared": training stops with it (even with allow_missing)."""


_FIX = (
    "The manifest is damaged or was not written by `python -m surgenet_ssl.prepare`; rerun prepare for this source "
    "(finished videos are kept), or fix the file."
)


def _fail(where: str, field: str, value: Any, expected: str) -> ManifestSchemaError:
    shown = repr(value)
    shown = shown if len(shown) <= 200 else shown[:200] + "..."
    return ManifestSchemaError(f"{where}: {field} = {shown}: expected {expected}. {_FIX}")


def _int(m: Mapping[str, Any], key: str, where: str, prefix: str = "", required: bool = True) -> None:
    if key not in m:
        if required:
            raise _fail(where, prefix + key, "<missing>", "an integer >= 0")
        return
    v = m[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise _fail(where, prefix + key, v, "an integer >= 0")


def _optional_str(m: Mapping[str, Any], key: str, where: str, prefix: str = "") -> None:
    if m.get(key) is not None and not isinstance(m[key], str):
        raise _fail(where, prefix + key, m[key], "a string")


def _check_shard(shard: Any, i: int, where: str) -> None:
    prefix = f"shards[{i}]."
    if not isinstance(shard, Mapping):
        raise _fail(where, f"shards[{i}]", shard, "an object with file, frames, bytes, sha256")
    if "file" not in shard:
        raise _fail(where, prefix + "file", "<missing>", "the shard's name relative to the manifest")
    try:
        L.check_manifest_name(shard["file"])
    except L.UnsafeNameError as e:
        raise ManifestSchemaError(f"{where}: {prefix}file: {e} {_FIX}") from None
    _int(shard, "frames", where, prefix)
    _int(shard, "bytes", where, prefix, required=False)
    sha = shard.get("sha256")
    if sha is not None and (not isinstance(sha, str) or not _SHA256.fullmatch(sha)):
        raise _fail(where, prefix + "sha256", sha, "64 lower-case hex digits or null")
    _optional_str(shard, "video", where, prefix)


def _check_source(m: Mapping[str, Any], where: str) -> None:
    _int(m, "frames", where)
    if "complete" in m and not isinstance(m["complete"], bool):
        raise _fail(where, "complete", m["complete"], "true or false")
    for key in ("pending", "inputs", "videos"):
        _int(m, key, where, required=False)
    for key in ("source", "procedure"):
        _optional_str(m, key, where)
    sizes = m.get("frame_sizes")
    if sizes is not None:
        if not isinstance(sizes, Mapping):
            raise _fail(where, "frame_sizes", sizes, 'an object: "<width>x<height>" -> frames')
        for size in sizes:
            if not isinstance(size, str) or not _FRAME_SIZE.fullmatch(size):
                raise _fail(where, "frame_sizes", size, 'keys "<width>x<height>" (e.g. "569x320")')
            _int(sizes, size, where, "frame_sizes.")
    shards = m.get("shards", [])
    if not isinstance(shards, list):
        raise _fail(where, "shards", shards, "a list of shard entries")
    for i, shard in enumerate(shards):
        _check_shard(shard, i, where)


def _check_collection(m: Mapping[str, Any], where: str) -> None:
    sources = m.get("sources")
    if not isinstance(sources, Mapping):
        raise _fail(where, "sources", sources, "an object: source name -> its folder (relative) or URL")
    for name, rel in sources.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise _fail(where, "sources", name, "source names without '/'")
        try:
            L.check_manifest_name(rel)
        except L.UnsafeNameError as e:
            raise ManifestSchemaError(f"{where}: sources.{name}: {e} {_FIX}") from None


def validate_manifest(manifest: Any, where: str, formats: Mapping[str, str], max_version: int) -> dict[str, Any]:
    """``manifest`` if it follows the schema of its ``format`` (``formats``: format -> "source"/"collection"),
    else :class:`ManifestSchemaError`. ``where`` (the file or URL) is named in the message."""
    if not isinstance(manifest, dict):
        raise _fail(where, "<top level>", type(manifest).__name__, "a JSON object")
    fmt = manifest.get("format")
    if fmt not in formats:
        raise _fail(where, "format", fmt, " or ".join(repr(f) for f in formats))
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _fail(where, "version", version, f"an integer from 1 to {max_version}")
    if formats[str(fmt)] == "collection":
        _check_collection(manifest, where)
    else:
        _check_source(manifest, where)
    return manifest

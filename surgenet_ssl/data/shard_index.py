"""Random access into WebDataset tar shards: an index of each sample's members (key, byte offset, size).

Why: an epoch visits frames in a global random order (surgenet_ssl.data.epochs), so a loader worker reads single
frames of many shards, not whole shards from their first frame. The index says where each sample's members are,
so a frame is one ``pread`` of its bytes; a member over a size cap is skipped before a byte of it is read.

- prepare's :class:`~surgenet_ssl.data.shards.ShardWriter` writes ``<shard>.tar.idx.json`` next to each shard
  (:func:`write_index`); for shards prepared before, :func:`scan_tar` builds it from the tar headers alone (the
  data are seeked over) and the loader caches it (:func:`load_index`).
- The index of a damaged tar holds the samples before the damage and ``complete=False``.
- JSON, so it can be read by hand; an index whose ``bytes`` differ from the shard's size is stale and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = [
    "INDEX_FORMAT",
    "INDEX_SUFFIX",
    "ShardIndex",
    "index_path",
    "load_index",
    "read_members",
    "scan_tar",
    "write_index",
]

INDEX_FORMAT = "surgenet-ssl/shard-index"
INDEX_VERSION = 1
INDEX_SUFFIX = ".idx.json"


@dataclass
class ShardIndex:
    """The samples of one tar shard in file order: ``members[i]`` = ``[(ext, data offset, size), ...]``."""

    bytes: int  # size of the tar file the index describes
    keys: list[str] = field(default_factory=list)
    members: list[list[tuple[str, int, int]]] = field(default_factory=list)
    complete: bool = True  # False: the tar is damaged after the listed samples

    def __len__(self) -> int:
        return len(self.keys)

    def sample_bytes(self, i: int) -> int:
        return sum(size for _, _, size in self.members[i])

    def largest_member(self, i: int) -> int:
        return max((size for _, _, size in self.members[i]), default=0)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "bytes": self.bytes,
            "complete": self.complete,
            "samples": [[k, [list(m) for m in ms]] for k, ms in zip(self.keys, self.members, strict=True)],
        }

    @classmethod
    def from_json(cls, obj: Any) -> ShardIndex:
        if not isinstance(obj, dict) or obj.get("format") != INDEX_FORMAT or int(obj.get("version", 0)) != 1:
            raise ValueError("not a surgenet-ssl shard index")
        keys, members = [], []
        for key, ms in obj["samples"]:
            keys.append(str(key))
            members.append([(str(e), int(o), int(s)) for e, o, s in ms])
        return cls(bytes=int(obj["bytes"]), keys=keys, members=members, complete=bool(obj.get("complete", True)))


def _split_name(name: str) -> tuple[str, str]:
    """``a/b/00000012.jpg`` -> (``a/b/00000012``, ``jpg``): WebDataset's rule (extension after the first dot)."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


def _scan(tar: tarfile.TarFile) -> Iterator[tuple[str, str, int, int]]:
    while True:
        info = tar.next()
        if info is None:
            return
        if info.isfile():
            key, ext = _split_name(info.name)
            yield key, ext, info.offset_data, info.size


def scan_tar(path: str | Path | None = None, fileobj: IO[bytes] | None = None) -> ShardIndex:
    """Index a tar from its headers (data are seeked over, not read). Raises ``tarfile.ReadError``/``OSError`` when
    not even the first header can be read; a tar damaged later gives the samples before the damage."""
    if fileobj is None:
        assert path is not None
        with open(path, "rb") as f:
            return scan_tar(fileobj=f)
    size = os.fstat(fileobj.fileno()).st_size
    index = ShardIndex(bytes=size)
    fileobj.seek(0)
    position: dict[str, int] = {}
    tar = tarfile.open(fileobj=fileobj, mode="r:")  # raises ReadError on a file that is no tar at all
    try:
        for key, ext, offset, length in _scan(tar):
            if offset + length > size:
                index.complete = False  # the data of the last member are cut
                break
            if not index.keys or index.keys[-1] != key:
                if key in position:  # members of one key must be adjacent (WebDataset's rule too)
                    continue
                position[key] = len(index.keys)
                index.keys.append(key)
                index.members.append([])
            index.members[-1].append((ext, offset, length))
    except (tarfile.TarError, OSError, EOFError):
        index.complete = False
    return index


def index_path(shard: str | Path) -> Path:
    return Path(f"{shard}{INDEX_SUFFIX}")


def write_index(shard: str | Path) -> Path:
    """Write ``<shard>.idx.json`` (called by prepare's shard writer once the shard is complete)."""
    target = index_path(shard)
    _write_json_atomic(target, scan_tar(shard).to_json())
    return target


def _write_json_atomic(path: Path, obj: Any) -> None:
    from surgenet_ssl.runtime.io_utils import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, separators=(",", ":")) + "\n")


def _read_index_file(path: Path, expect_bytes: int) -> ShardIndex | None:
    try:
        index = ShardIndex.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return index if index.bytes == expect_bytes else None


def load_index(shard: Path, cache_dir: Path | None = None, fileobj: IO[bytes] | None = None) -> ShardIndex:
    """The index of a local shard: its sidecar written by prepare, else a copy cached in ``cache_dir``, else built
    from its headers (and cached there when ``cache_dir`` is given). Raises FileNotFoundError if it is missing."""
    size = os.fstat(fileobj.fileno()).st_size if fileobj is not None else shard.stat().st_size
    found = _read_index_file(index_path(shard), size)
    if found is not None:
        return found
    cached = None
    if cache_dir is not None:
        st = shard.stat()
        tag = hashlib.sha256(f"{shard.resolve()}\n{st.st_size}\n{st.st_mtime_ns}".encode()).hexdigest()[:16]
        cached = cache_dir / f"{tag}-{shard.name}{INDEX_SUFFIX}"
        found = _read_index_file(cached, size)
        if found is not None:
            return found
    index = scan_tar(shard, fileobj=fileobj)
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            _write_json_atomic(cached, index.to_json())
        except OSError:  # a read-only cache only costs the scan again
            pass
    return index


def read_members(f: IO[bytes], index: ShardIndex, i: int, extensions: tuple[str, ...]) -> dict[str, bytes]:
    """The members ``extensions`` of sample ``i`` (one read spanning them). Raises ``EOFError`` if the file ends
    early (it changed since it was indexed)."""
    wanted = [(e, o, s) for e, o, s in index.members[i] if e in extensions]
    if not wanted:
        return {}
    first = min(o for _, o, _ in wanted)
    last = max(o + s for _, o, s in wanted)
    f.seek(first)
    chunk = f.read(last - first)
    if len(chunk) != last - first:
        raise EOFError(f"unexpected end of data in sample {index.keys[i]}")
    return {e: chunk[o - first : o - first + s] for e, o, s in wanted}

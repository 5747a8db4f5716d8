"""What ``prepare`` reads: folders, zip and tar archives, and parquet image tables, listed as one tree of members.

Releases come as archives (every SurgeNet source is a zip or a tar) and hub datasets as parquet tables with the
image bytes in a column. Reading them in place (no unpacking to disk) gives the same member paths, hence the same
keys, counts and resumability, as the unpacked folder: an archive given as ``input`` is its own root, and an
archive or table found inside a folder is read as if unpacked where it lies, into a folder named after it (a
single top folder of that same name inside is not doubled, as ``unzip`` of most releases creates it).

Member names are untrusted data: a name that leaves its root (``..``, an absolute or drive path) stops the
listing with an error naming the archive and the member; links and devices in a tar are never followed (counted
as ignored). Sizes are bounded: a member whose declared size is over the cap is refused before anything is read,
and reads never return more than the declared size (a zip bomb that lies about its size fails at its CRC/length
check). Videos inside archives are copied to a temporary file one at a time, as decoders need to seek.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tarfile
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgenet_ssl.data.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

__all__ = [
    "ARCHIVE_EXTENSIONS",
    "TABLE_EXTENSIONS",
    "MAX_IMAGE_BYTES",
    "MAX_VIDEO_BYTES",
    "InputError",
    "Member",
    "list_members",
    "read_member",
    "local_copy",
]

ARCHIVE_EXTENSIONS = (".zip", ".tar")
TABLE_EXTENSIONS = (".parquet",)
_COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")
MAX_IMAGE_BYTES = 256 << 20  # one frame; a real one is < 30 MB even as a 16-bit 4K PNG
MAX_VIDEO_BYTES = 64 << 30  # one video (a 4-hour 1080p surgery is ~20 GB)
_NAME_COLUMNS = ("path", "file_name", "filename", "image_path", "name", "file", "frame")


class InputError(RuntimeError):
    """An input that cannot be read as a whole (bad archive, unsafe member name, table without image column)."""


@dataclass(frozen=True)
class Member:
    """One video or image of an input: ``rel`` names it (and its key), ``container``/``where`` locate its bytes."""

    rel: str  # posix path relative to the input root
    media: str  # "video" | "image"
    size: int  # bytes (declared by the archive); 0 where a table does not say
    container: str = ""  # "" for a plain file, else the archive/table path
    kind: str = "file"  # file | zip | tar | parquet
    where: str = ""  # file: its path; zip: member name; tar: "<data offset>"; parquet: "<row group>:<row>"

    def describe(self) -> str:
        return f"{self.container}: {self.where}" if self.container else self.where


def media_of(name: str) -> str:
    ext = os.path.splitext(name)[1].lower()
    return "video" if ext in VIDEO_EXTENSIONS else "image" if ext in IMAGE_EXTENSIONS else ""


def _cap(media: str) -> int:
    return MAX_VIDEO_BYTES if media == "video" else MAX_IMAGE_BYTES


def is_container(name: str) -> bool:
    low = name.lower()
    return low.endswith(ARCHIVE_EXTENSIONS + TABLE_EXTENSIONS + _COMPRESSED_TARS)


def safe_rel(name: str, container: str) -> str | None:
    """A member name as a relative posix path; None for hidden/system entries (``.x``, ``__MACOSX``).

    Raises :class:`InputError` for a name that would leave its root: data is never addressed by such a path."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise InputError(
            f"{container}: member {name!r} points outside the archive (absolute path or '..'). The archive is not a "
            "plain release; it was not read. Check where it comes from."
        )
    parts = [p for p in parts if p not in ("", ".")]
    if not parts or any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return None
    return "/".join(parts)


def _strip_own_folder(rels: list[str], stem: str) -> int:
    """Characters to drop from every member path: ``<stem>/`` when all members sit in one folder of that name."""
    prefix = stem + "/"
    return len(prefix) if rels and all(r.startswith(prefix) for r in rels) else 0


def container_stem(path: Path) -> str:
    name = path.name
    for ext in sorted(ARCHIVE_EXTENSIONS + TABLE_EXTENSIONS + _COMPRESSED_TARS, key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def list_members(root: Path, skip: set[Path], ignored: Counter[str]) -> list[Member]:
    """Every video and image under ``root`` (a folder, an archive, a table or one video), archives included.

    ``skip``: folders not to enter (the output inside the input). Other files are counted in ``ignored`` by
    extension; hidden files and folders are skipped."""
    if root.is_file():
        if is_container(root.name):
            return _container_members(root, "", ignored)
        media = media_of(root.name)
        if media != "video":
            raise InputError(f"input={root} is a file but not a video ({', '.join(VIDEO_EXTENSIONS)}) or archive.")
        return [Member(root.name, media, root.stat().st_size, "", "file", str(root))]
    members: list[Member] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs or Path(real) in skip:  # symlink loop / output folder inside the input
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            path = Path(dirpath) / name
            if is_container(name):
                folder = rel[: len(rel) - len(name)] + container_stem(path)
                members += _container_members(path, folder + "/", ignored)
                continue
            media = media_of(name)
            if not media:
                ignored[os.path.splitext(name)[1].lower()] += 1
                continue
            try:
                size = path.stat().st_size
            except OSError:
                size = 0
            members.append(Member(rel, media, size, "", "file", str(path)))
    return members


def _container_members(path: Path, prefix: str, ignored: Counter[str]) -> list[Member]:
    """Members of an archive/table, their paths under ``prefix`` (its folder when it lies inside a folder)."""
    low = path.name.lower()
    if low.endswith(_COMPRESSED_TARS):
        raise InputError(
            f"{path}: a compressed tar cannot be read member by member without decompressing all of it for every "
            f"video. Decompress it once, keeping the archive (`gunzip -k`, `bunzip2 -k`, `unxz -k`, `zstd -d`), and "
            "give the .tar."
        )
    try:
        if low.endswith(".zip"):
            found = _zip_members(path, ignored)
        elif low.endswith(".tar"):
            found = _tar_members(path, ignored)
        else:
            found = _parquet_members(path)
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as e:
        raise InputError(f"{path}: cannot read it as an archive ({type(e).__name__}: {e})") from e
    cut = _strip_own_folder([m.rel for m in found], container_stem(path))
    out = []
    for m in found:
        if m.size > _cap(m.media):
            raise InputError(
                f"{path}: member {m.where!r} declares {m.size:,} bytes, over the {_cap(m.media):,}-byte cap for one "
                f"{m.media}. Nothing was read; a release does not hold such a file (an archive bomb?)."
            )
        out.append(Member(prefix + m.rel[cut:], m.media, m.size, str(path), m.kind, m.where))
    return out


def _zip_members(path: Path, ignored: Counter[str]) -> list[Member]:
    found = []
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            rel = safe_rel(info.filename, str(path))
            if rel is None:
                continue
            media = media_of(rel)
            if not media or info.flag_bits & 0x1:  # not media, or encrypted (cannot be read without the password)
                ignored[os.path.splitext(rel)[1].lower() + (" (encrypted)" if media else "")] += 1
                continue
            found.append(Member(rel, media, info.file_size, kind="zip", where=info.filename))
    return found


def _tar_members(path: Path, ignored: Counter[str]) -> list[Member]:
    found = []
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if info.isdir():
                continue
            rel = safe_rel(info.name, str(path))
            if rel is None:
                continue
            media = media_of(rel)
            if not info.isfile() or info.sparse is not None or not media:  # links/devices are never followed
                ignored[os.path.splitext(rel)[1].lower() + ("" if info.isfile() else " (link/device)")] += 1
                continue
            found.append(Member(rel, media, info.size, kind="tar", where=str(info.offset_data)))
    return found


def _arrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise InputError(
            "reading parquet image tables needs pyarrow: pip install 'surgenet-ssl[parquet]' (or pip install pyarrow)"
        ) from e
    return pq


def _table_columns(pf: Any, path: Path) -> tuple[str, str | None, str | None]:
    """(image column, its bytes field or None for a plain binary column, name column or None)."""
    import pyarrow as pa

    schema = pf.schema_arrow
    image = name = field = None
    for f in schema:
        if pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0 and image is None:
            image, field = f.name, "bytes"
            if f.type.get_field_index("path") >= 0:
                name = f"{f.name}.path"
        elif (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)) and image is None:
            image = f.name
    if image is None:
        raise InputError(
            f"{path}: no image column (binary, or a struct with 'bytes' like Hugging Face's Image) in {schema.names}."
        )
    strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    by_lower = {s.lower(): s for s in strings}
    column = next((by_lower[c] for c in _NAME_COLUMNS if c in by_lower), None)
    return image, field, column or name


def _parquet_members(path: Path) -> list[Member]:
    pf = _arrow().ParquetFile(path)
    _, _, name_col = _table_columns(pf, path)
    found = []
    row0 = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        names = pf.read_row_group(g, columns=[name_col]).column(0).to_pylist() if name_col else [None] * n
        if name_col and "." in name_col:  # a struct field read alone comes back as a struct
            names = [v.get(name_col.split(".", 1)[1]) if isinstance(v, dict) else v for v in names]
        for i, name in enumerate(names):
            row = row0 + i
            # A row without a name is named by its position: stable for the same table.
            rel = safe_rel(str(name), str(path)) if name else f"{row:08d}.png"
            if rel is None:
                continue
            if media_of(rel) != "image":
                rel += ".png"  # the column holds images whatever the name says
            found.append(Member(rel, "image", 0, kind="parquet", where=f"{g}:{i}"))
        row0 += n
    return found


# ---------------------------------------------------------------------------------------------------------- reading
_open: dict[str, Any] = {}  # per process: open archives and the last parquet row group, reused by a unit's reads


def _zip(container: str) -> zipfile.ZipFile:
    zf = _open.get(container)
    if zf is None:
        zf = _open[container] = zipfile.ZipFile(container)
    return zf


def read_member(m: Member) -> bytes:
    """The bytes of a member, never more than its cap; errors name the archive and the member."""
    cap = _cap(m.media)
    try:
        if m.kind == "file":
            with open(m.where, "rb") as f:
                data = f.read(cap + 1)
        elif m.kind == "zip":
            with _zip(m.container).open(m.where) as f:
                data = f.read(min(cap, m.size) + 1)
            if len(data) != m.size:
                raise InputError(f"{m.describe()}: {len(data)} bytes, the archive declares {m.size}")
        elif m.kind == "tar":
            with open(m.container, "rb") as f:
                f.seek(int(m.where))
                data = f.read(m.size)
            if len(data) != m.size:
                raise InputError(f"{m.describe()}: cut short ({len(data)} of {m.size} bytes; truncated archive?)")
        else:
            data = _parquet_cell(m)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise InputError(f"{m.describe()}: cannot read it ({type(e).__name__}: {e})") from e
    if len(data) > cap:
        raise InputError(f"{m.describe()}: over the {cap:,}-byte cap for one {m.media}; not read")
    return data


def _parquet_cell(m: Member) -> bytes:
    group, row = (int(x) for x in m.where.split(":"))
    cache_key = f"{m.container}#{group}"
    column = _open.get(cache_key)
    if column is None:
        for k in [k for k in _open if "#" in k]:  # one row group in memory at a time
            del _open[k]
        pf = _arrow().ParquetFile(m.container)
        image, field, _ = _table_columns(pf, Path(m.container))
        column = pf.read_row_group(group, columns=[image]).column(0)
        if field:
            column = column.combine_chunks().field(field)
        _open[cache_key] = column
    value = column[row].as_py()
    if not isinstance(value, bytes):
        raise InputError(f"{m.container}: row {m.where} has no image bytes")
    return value


@contextlib.contextmanager
def local_copy(m: Member, tmp_dir: Path) -> Iterator[Path]:
    """A path to the member's bytes for decoders that need a seekable file: the file itself, or a temporary copy
    (hidden ``.tmp`` in ``tmp_dir``: removed after, or swept by the next run if this one is killed)."""
    if m.kind == "file":
        yield Path(m.where)
        return
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f".member.{os.getpid()}.{abs(hash(m.where)) % 10**8}{os.path.splitext(m.rel)[1]}.tmp"
    try:
        if m.kind == "zip":
            with _zip(m.container).open(m.where) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        elif m.kind == "tar":
            with open(m.container, "rb") as src, open(tmp, "wb") as dst:
                src.seek(int(m.where))
                left = m.size
                while left:
                    chunk = src.read(min(left, 1 << 20))
                    if not chunk:
                        raise InputError(f"{m.describe()}: cut short (truncated archive?)")
                    dst.write(chunk)
                    left -= len(chunk)
        else:
            tmp.write_bytes(read_member(m))
        if tmp.stat().st_size != m.size and m.size:
            raise InputError(f"{m.describe()}: {tmp.stat().st_size} bytes, the archive declares {m.size}")
        yield tmp
    except (zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"{m.describe()}: cannot read it ({type(e).__name__}: {e})") from e
    finally:
        tmp.unlink(missing_ok=True)

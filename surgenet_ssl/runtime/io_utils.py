"""Atomic file writes: a reader (or a crash) never sees a half-written checkpoint, shard or export; and an output
directory checked writable before the work that fills it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a small text file (run config, wandb id) so that readers never see a part of it."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_torch(obj: object, path: str | Path) -> None:
    """``torch.save`` through a file object: given a path, torch names the zip archive's root folder after the file,
    and the atomic writes use a random temporary name, so the same weights gave different bytes on every export."""
    import torch

    with open(path, "wb") as f:
        torch.save(obj, f)


def read_text_bounded(path: str | Path, max_bytes: int, encoding: str = "utf-8") -> str:
    """The text of a data file (a label list, an annotation json) whose size is checked before it is read: a file
    that is far larger than its kind ever is fails with its path and size instead of filling the memory."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(
            f"{path} is {size:,} bytes, more than the {max_bytes:,} such a file can be: is it the right file?"
        )
    return path.read_text(encoding=encoding)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (checksums in manifests, model cards and download checks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def build_dir_once(target: str | Path, is_complete, build, timeout_s: float = 600.0) -> bool:
    """Create the cached directory ``target`` with ``build(tmp_dir)`` unless ``is_complete(target)``: one process
    builds (a file lock beside it; others wait), into a temp dir renamed into place, so a crash never leaves a
    half-built cache. Returns True when this call built it."""
    import shutil

    from filelock import FileLock, Timeout

    target = Path(target)
    if is_complete(target):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.parent / f".{target.name}.lock"))
    try:
        with lock.acquire(timeout=timeout_s):
            if is_complete(target):  # built by another process while we waited
                return False
            tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                build(tmp)
                if target.exists():
                    old = target.parent / f".{target.name}.old-{os.getpid()}"
                    os.replace(target, old)
                    shutil.rmtree(old, ignore_errors=True)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except Timeout:
        raise TimeoutError(
            f"Waited {timeout_s:.0f} s for another process generating {target} (lock {lock.lock_file}). If no such "
            "process runs, delete the lock file and retry."
        ) from None
    return True


def check_writable(output: Path) -> None:
    """Create ``output`` and write a probe file there now, so a bad ``output=`` fails before minutes of feature
    extraction instead of after them."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ValueError(
            f"output={output} is not a writable directory ({type(err).__name__}: {err.strerror or err}); "
            "pass output=<a directory you can write to>."
        ) from err

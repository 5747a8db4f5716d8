"""Errors of the disk or file system, said once with the path and the fix.

Why: a full disk during training surfaces as ``RuntimeError: [enforce fail at inline_container.cc:672] . unexpected
pos ...`` from ``torch.save`` (not an ``OSError``), a read-only run dir as Hydra's "Unable to configure handler
'file'", and either ends in hundreds of lines of traceback that name neither the path nor what to do. The entry
points turn them into one line (:func:`storage_error_message`); writers of large files call :func:`as_storage_error`
to recognise a full disk behind a library's own error.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["StorageError", "as_storage_error", "storage_error_message", "write_failure_message", "RunDirFileHandler"]

_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
_FULL = (errno.ENOSPC, errno.EDQUOT)
_NEARLY_FULL_BYTES = 64 << 20  # a write failed and less than this is free: the disk filled


class StorageError(OSError):
    """A write the file system refused, with a message that names the path, the cause and the fix."""


def _fix(code: int, path: str) -> str:
    where = Path(path).parent if path else "the destination"
    if code in _FULL:
        return (
            f"Free space there (`df -h {where}`) or write to another disk (training: hydra.run.dir=DIR; prepare: "
            "output=DIR; export: output=DIR). What was finished before is intact (checkpoints, shards and exports are "
            "written atomically): rerun the same command to continue."
        )
    return (
        "Choose a location you can write to (training: hydra.run.dir=DIR; prepare: output=DIR; export: output=DIR), "
        f"or fix the permissions of {where}."
    )


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def storage_error_message(err: BaseException) -> str | None:
    """One line for a disk / file-system error anywhere in ``err``'s chain (full, quota, read-only, no permission),
    or None when ``err`` is something else."""
    for e in _chain(err):
        if isinstance(e, StorageError):
            return str(e.strerror or e)
        if isinstance(e, OSError) and e.errno in _REASONS:
            path = str(e.filename or "")
            target = f"cannot write {path}" if path else "a file could not be written"
            return f"{target}: {_REASONS[e.errno]}. {_fix(e.errno, path)}"
    return None


def as_storage_error(err: BaseException, path: str | Path) -> StorageError | None:
    """``err`` (raised while writing ``path``) as a :class:`StorageError` when the file system is the cause: an
    ``OSError`` with a storage errno, or any error (``torch.save``'s ``RuntimeError``) while the disk is full."""
    path = str(path)
    code = next((e.errno for e in _chain(err) if isinstance(e, OSError) and e.errno in _REASONS), None)
    if code is None:
        try:
            free = shutil.disk_usage(Path(path).parent).free
        except OSError:
            return None
        if free >= _NEARLY_FULL_BYTES:
            return None
        code = errno.ENOSPC
    message = f"cannot write {path}: {_REASONS[code]}. {_fix(code, path)}"
    return StorageError(code, message, path)


def write_failure_message(err: BaseException, path: str | Path) -> str | None:
    """:func:`storage_error_message`, or, for a library's own error while writing into ``path`` (a safetensors or
    torch writer), the full-disk message when the disk there is full."""
    found = storage_error_message(err)
    if found is not None:
        return found
    storage = as_storage_error(err, path)
    return None if storage is None else str(storage.strerror)


class RunDirFileHandler(logging.FileHandler):
    """The run's log file (Hydra's ``file`` handler). A run dir that cannot be written to (read-only, full, no
    permission) leaves logging to the console with one warning, instead of Hydra's "Unable to configure handler
    'file'": the entry point then reports the first write that fails with its path and the fix."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None, delay: bool = False) -> None:
        try:
            super().__init__(filename, mode, encoding, delay)
        except OSError as err:
            logging.Handler.__init__(self)
            self.baseFilename, self.mode, self.encoding, self.stream = os.path.abspath(filename), mode, encoding, None
            self._failed = True
            reason = _REASONS.get(err.errno or 0, err.strerror or str(err))
            print(f"[WARNING] cannot write the log file {filename} ({reason}); logging to the console only", flush=True)
        else:
            self._failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self._failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        """A disk that fills during the run: stop writing the file after one warning (not a traceback per line)."""
        if not self._failed:
            self._failed = True
            print(f"[WARNING] the log file {self.baseFilename} cannot be written any more; console only", flush=True)

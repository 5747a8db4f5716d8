"""Where prepared data lives: a local directory or a URL (``http(s)://``, ``s3://``, ``gs://``, ``pipe:``).

Why this module exists:
- ``Path("http://host/x")`` collapses ``//`` into ``/``, so URL locations stay ``str`` while local ones stay
  ``Path``; :func:`join` appends a manifest's relative names to either (an absolute URL in a manifest wins).
- Remote files are opened through ``webdataset.gopen``: curl for http(s), gsutil for gs, the shell for ``pipe:``
  (``pipe:CMD`` reads the output of CMD; joined names are appended to the command, so ``pipe:cat /data/src`` reads
  ``cat /data/src/manifest.json``). The installed webdataset has no s3 handler: s3 URLs run ``aws s3 cp URL -``.
- Those tools report failures only through their exit status (curl -f exits 22 on a 404, 18 on a cut transfer,
  with no output), and webdataset checks it only when a read happens to see the process end. :class:`RemoteStream`
  reads the tool's output itself and checks the status at the end of the data, so a 404 is an error (never an
  empty file) and a cut transfer is an error (never a silently short file).
- A remote shard can be cached while it streams: the bytes go to a temporary file in the cache dir that is renamed
  into place only when the whole transfer succeeded and matches the manifest's size and sha256, so a cut or
  abandoned download never leaves a partial cached shard.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shlex
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit
from urllib.request import url2pathname

__all__ = [
    "Location",
    "RemoteNotFoundError",
    "RemoteReadError",
    "RemoteStream",
    "as_location",
    "basename",
    "cache_file",
    "is_url",
    "join",
    "read_bytes",
]

log = logging.getLogger(__name__)

Location = str | Path  # str: a URL; Path: a local file or directory

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(//)?")  # 2+ letters: never a Windows drive letter

# Exit statuses of the tools gopen runs, in words (curl's are documented in `man curl`, EXIT CODES).
_CURL_STATUS = {
    6: "could not resolve the host",
    7: "could not connect to the server",
    18: "the transfer was cut before the end (partial file)",
    22: "HTTP error (404 not found, 403 forbidden, ...)",
    28: "timed out",
    35: "TLS handshake failed",
    52: "the server sent an empty reply",
    56: "the connection broke while receiving data",
}
_NOT_FOUND = {("curl", 22), ("gsutil", 1), ("aws", 1)}  # what a missing object exits with (or no access)


class RemoteReadError(OSError):
    """Reading a URL failed: the tool that fetches it exited with an error status."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot read {url}: {reason}")
        self.url, self.reason = url, reason


class RemoteNotFoundError(RemoteReadError, FileNotFoundError):
    """The URL does not exist (HTTP 4xx, missing object) or may not be read."""


def is_url(location: object) -> bool:
    """True for ``scheme://...`` and ``pipe:...`` strings (``file://`` counts as local, see :func:`as_location`)."""
    if isinstance(location, Path) or not isinstance(location, str):
        return False
    m = _SCHEME.match(location)
    if m is None:
        return False
    scheme = m.group(1).lower()
    return scheme != "file" and (m.group(2) is not None or scheme == "pipe")


def as_location(value: str | Path) -> Location:
    """A config value as a location: URLs stay strings, local paths become ``Path`` (``~`` and ``file://`` too)."""
    if isinstance(value, Path):
        return value.expanduser()
    text = str(value)
    if text.lower().startswith("file://"):
        return Path(url2pathname(urlsplit(text).path))
    return text if is_url(text) else Path(text).expanduser()


def join(base: Location, name: str) -> Location:
    """``base``/``name`` for a local directory or a URL; ``name`` may itself be an absolute URL (used as is)."""
    if is_url(name):
        return name
    if not is_url(base):
        return Path(base) / name
    text = str(base)
    if text.lower().startswith("pipe:"):
        return f"{text.rstrip('/')}/{name}"
    parts = urlsplit(text)  # keep a query string (signed URLs) after the joined path
    return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{name.lstrip('/')}"))


def basename(location: Location) -> str:
    """The last name of a location (``http://h/data/src`` -> ``src``), e.g. a source name when none is given."""
    if not is_url(location):
        return Path(location).name
    text = str(location)
    path = text.split()[-1] if text.lower().startswith("pipe:") else urlsplit(text).path
    return path.rstrip("/").rsplit("/", 1)[-1]


def _tool(url: str) -> str:
    scheme = url.split(":", 1)[0].lower()
    return {"gs": "gsutil", "s3": "aws", "pipe": "shell command"}.get(scheme, "curl")


def _explain(tool: str, status: int) -> str:
    if tool == "curl" and status in _CURL_STATUS:
        return f"curl exit status {status}: {_CURL_STATUS[status]}"
    if tool in ("gsutil", "aws") and status == 1:
        return f"{tool} exit status 1: object missing, no access or no credentials (run the command by hand to see)"
    if status < 0:
        return f"{tool} killed by signal {-status}"
    return f"{tool} exit status {status}"


class RemoteStream:
    """Binary read stream of one URL via ``webdataset.gopen``, with the tool's exit status checked at the end.

    ``tee_to``: also write the bytes into this cache file; :meth:`finish` reads the rest, checks ``size`` and
    ``sha256`` (when given) and renames the temporary file into place. :meth:`close` without a successful
    :meth:`finish` (an error, a cut transfer, an abandoned read) deletes the temporary file.
    """

    def __init__(
        self, url: str, tee_to: Path | None = None, size: int | None = None, sha256: str | None = None
    ) -> None:
        from webdataset.gopen import Pipe, gopen, gopen_schemes

        self.url, self.tool = url, _tool(url)
        self.bytes_read = 0
        self._eof = self._closed = False
        if self.tool != "shell command" and shutil.which(self.tool) is None:  # fail loudly, not "file missing"
            raise RuntimeError(
                f"Cannot read {url}: {url.split(':', 1)[0]} URLs are read with `{self.tool}` (through "
                f"webdataset.gopen), which is not on PATH. Install it (and its credentials), or copy the data locally."
            )
        target = url
        if url.lower().startswith("s3://") and "s3" not in gopen_schemes:
            target = f"pipe:aws s3 cp {shlex.quote(url)} -"
        handle = gopen(target, "rb")
        self._pipe = handle if isinstance(handle, Pipe) else None
        if self._pipe is not None:
            self._pipe.ignore_errors = True  # the status is checked here, at the end of the data
            self._raw = self._pipe.stream
        else:  # a handler that returns a plain stream
            self._raw = handle
        self._size, self._sha256 = size, sha256
        self._target, self._tmp, self._tmp_file, self._hash = tee_to, None, None, None
        if tee_to is not None:
            tee_to.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{tee_to.name}.", suffix=".part", dir=tee_to.parent)
            self._tmp, self._tmp_file, self._hash = Path(tmp), os.fdopen(fd, "wb"), hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all with ``n < 0``); b"" at the end. Raises :class:`RemoteReadError` at the end of
        the data if the tool failed (a 404, a cut transfer, ...)."""
        if self._eof or n == 0:
            return b""
        data = self._raw.read() if n is None or n < 0 else self._raw.read(n)
        if data:
            self.bytes_read += len(data)
            if self._tmp_file is not None and self._hash is not None:  # set together (tee_to)
                self._tmp_file.write(data)
                self._hash.update(data)
            return data
        self._eof = True
        self._check_status()
        return b""

    def _check_status(self) -> None:
        if self._pipe is None:
            return
        status = self._pipe.proc.wait()
        if status in self._pipe.ignore_status:
            return
        error = RemoteNotFoundError if (self.tool, status) in _NOT_FOUND else RemoteReadError
        raise error(self.url, _explain(self.tool, status))

    def finish(self) -> bool:
        """Read to the end (raises if the transfer failed) and commit the cached copy; True if it was cached."""
        while self.read(1 << 16):
            pass
        if self._tmp_file is None or self._tmp is None or self._target is None:
            return False
        self._tmp_file.flush()
        os.fsync(self._tmp_file.fileno())
        self._tmp_file.close()
        problem = None
        if self._size is not None and self.bytes_read != int(self._size):
            problem = f"{self.bytes_read} bytes, the manifest says {self._size}"
        elif self._sha256 and self._hash is not None and self._hash.hexdigest() != self._sha256:
            problem = "sha256 differs from the manifest"
        if problem is not None:
            log.warning("not caching %s: %s (the remote file changed or is damaged)", self.url, problem)
            return False
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(self._tmp, 0o666 & ~mask)  # mkstemp creates 0600; a shared cache needs the usual permissions
        os.replace(self._tmp, self._target)
        self._tmp = None
        return True

    def close(self) -> None:
        """Stop the transfer (if still running) and drop an uncommitted cached copy. Never raises."""
        if self._closed:
            return
        self._closed = True
        if self._tmp_file is not None and not self._tmp_file.closed:
            self._tmp_file.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        if self._pipe is not None and self._pipe.proc.poll() is None:
            self._pipe.proc.kill()  # an abandoned read: do not wait for the rest of a large file
        try:
            self._raw.close()
        except OSError:
            pass
        if self._pipe is not None:
            self._pipe.proc.wait()

    def __enter__(self) -> RemoteStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from garbage collection
            pass


def read_bytes(location: Location) -> bytes:
    """The whole content of a local file or URL (raises OSError, :class:`RemoteNotFoundError` for a 404)."""
    if not is_url(location):
        return Path(location).read_bytes()
    with RemoteStream(str(location)) as stream:
        chunks = []
        while chunk := stream.read(1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)


def cache_file(cache_dir: str | Path, url: str, sha256: str | None = None) -> Path:
    """The cache file of a remote shard: named by URL and content hash, so a re-prepared shard is fetched again."""
    key = hashlib.sha256(f"{url}\n{sha256 or ''}".encode()).hexdigest()[:20]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", basename(url))[-80:] or "shard"
    return Path(cache_dir).expanduser() / f"{key}-{name}"

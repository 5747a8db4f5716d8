"""Where prepared data lives: a local directory or a URL (``http(s)://``, ``s3://``, ``gs://``, ``pipe:``).

Why this module exists:
- ``Path("http://host/x")`` collapses ``//`` into ``/``, so URL locations stay ``str`` while local ones stay
  ``Path``; :func:`join` appends a manifest's relative names to either (an absolute http(s)/s3/gs URL in a
  manifest wins).
- Names inside manifests are data, not commands (see README "Security model"): :func:`join` accepts only relative,
  normalised names in the character set prepare writes (no scheme, no leading ``/``, no ``..``, no shell
  characters), or absolute ``http(s)``/``s3``/``gs`` URLs; never ``pipe:``. A ``pipe:`` command comes only from the
  user's own config or command line; a name joined to it is shell-quoted.
- Remote files are read by a tool run with an argument list (never a shell): curl for http(s) (``--globoff``: a
  name is never a glob pattern; ``--proto =http,https`` also for redirects; a stall limit, so a server that accepts
  and never answers fails the read instead of hanging training), gsutil for gs, ``aws s3 cp URL -`` for s3, and
  ``sh -c`` for the user's own ``pipe:CMD`` (``pipe:cat /data/src`` reads ``cat /data/src/manifest.json``).
  Any other scheme is a configuration error.
- Those tools report failures only through their exit status (curl -f exits 22 on a 404, 18 on a cut transfer,
  with no output). :class:`RemoteStream` reads the tool's output itself and checks the status at the end of the
  data, so a 404 is an error (never an empty file) and a cut transfer is an error (never a silently short file).
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
import subprocess
import tempfile
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit
from urllib.request import url2pathname

__all__ = [
    "MANIFEST_URL_SCHEMES",
    "Location",
    "RemoteNotFoundError",
    "RemoteReadError",
    "RemoteStream",
    "UnsafeNameError",
    "as_location",
    "check_manifest_name",
    "basename",
    "cache_file",
    "is_url",
    "join",
    "read_bytes",
    "remote_command",
]

log = logging.getLogger(__name__)

Location = str | Path  # str: a URL; Path: a local file or directory

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(//)?")  # 2+ letters: never a Windows drive letter

MANIFEST_URL_SCHEMES = ("http", "https", "s3", "gs")  # what an absolute URL inside a manifest may use
_CONFIG_SCHEMES = (*MANIFEST_URL_SCHEMES, "pipe")  # what the user's own config may use (plus local paths)
# A relative name inside a manifest: path components of the characters prepare writes, none starting with a dot or
# a dash (so no ``..``, no hidden files, no command-line options), separated by single slashes.
_NAME_PART = r"[A-Za-z0-9_][A-Za-z0-9_.+-]*"
_SAFE_NAME = re.compile(rf"{_NAME_PART}(/{_NAME_PART})*")
_URL_TEXT = re.compile(r"[!#-~]+")  # printable ASCII without spaces or quotes: nothing a tool could misread

# Remote reads give up when no data has come for this long (curl --speed-time), and connecting for this long.
STALL_SECONDS = float(os.environ.get("SURGENET_SSL_REMOTE_STALL_S", "60"))
CONNECT_SECONDS = float(os.environ.get("SURGENET_SSL_REMOTE_CONNECT_S", "30"))

# Exit statuses of the tools that read URLs, in words (curl's are documented in `man curl`, EXIT CODES).
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


class UnsafeNameError(ValueError):
    """A name inside a manifest breaks the rule for data (a command, an absolute path, ``..``, odd characters)."""


NAME_RULE = (
    "a name inside a manifest must be a relative path of letters, digits and _ . + - (no leading '/', no '..', no "
    "component starting with '.' or '-'), or an absolute URL with one of the schemes "
    + ", ".join(MANIFEST_URL_SCHEMES)
    + "; never a pipe: command (commands come only from your own config or command line)"
)


def check_manifest_name(name: object, where: str = "") -> str:
    """``name`` if it may be joined to a source location, else :class:`UnsafeNameError` naming ``where`` and the
    rule. Accepts what prepare writes (``shards/<video>-00000.tar``, a collection's ``<source>``) and absolute
    ``http(s)``/``s3``/``gs`` URLs."""
    at = f"{where}: " if where else ""
    if not isinstance(name, str):
        raise UnsafeNameError(f"{at}expected a string, got {type(name).__name__} {name!r}. Rule: {NAME_RULE}.")
    m = _SCHEME.match(name)
    if m is not None and (m.group(2) is not None or m.group(1).lower() == "pipe"):
        scheme = m.group(1).lower()
        host = urlsplit(name).netloc if m.group(2) else ""
        if scheme in MANIFEST_URL_SCHEMES and host and _URL_TEXT.fullmatch(name) and "'" not in name:
            return name
        raise UnsafeNameError(f"{at}{name!r} is not allowed. Rule: {NAME_RULE}.")
    if len(name) > 4096 or not _SAFE_NAME.fullmatch(name):
        raise UnsafeNameError(f"{at}{name!r} is not allowed. Rule: {NAME_RULE}.")
    return name


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
    """A value of the user's own config as a location: URLs stay strings, local paths become ``Path`` (``~`` and
    ``file://`` too). A URL scheme that cannot be read (``ftp://``, a typo) is a :class:`ValueError`."""
    if isinstance(value, Path):
        return value.expanduser()
    text = str(value)
    if text.lower().startswith("file://"):
        return Path(url2pathname(urlsplit(text).path))
    if not is_url(text):
        return Path(text).expanduser()
    scheme = text.split(":", 1)[0].lower()
    if scheme not in _CONFIG_SCHEMES:
        raise ValueError(
            f"{text}: URLs with the scheme {scheme!r} cannot be read. Use a local path (or file://), "
            + ", ".join(f"{s}://" for s in MANIFEST_URL_SCHEMES)
            + " or pipe:COMMAND."
        )
    return text


def join(base: Location, name: str, *, trusted: bool = False) -> Location:
    """``base``/``name`` for a local directory or a URL.

    ``name`` comes from a manifest unless ``trusted`` (the user's own config, e.g. a source name): it must pass
    :func:`check_manifest_name`, and an absolute http(s)/s3/gs URL is used as is. Joined to a ``pipe:`` command,
    the name is shell-quoted."""
    if not trusted:
        check_manifest_name(name)
        if is_url(name):
            return name
    if not is_url(base):
        return Path(base) / name
    text = str(base)
    if text.lower().startswith("pipe:"):
        return f"{text.rstrip('/')}/{shlex.quote(name.lstrip('/'))}"
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


def remote_command(url: str) -> list[str]:
    """The argument list that reads ``url`` to standard output (run without a shell, except the user's own
    ``pipe:`` command). http(s): curl with no URL globbing, no protocol but http(s) (redirects too), a connect
    timeout and a stall limit (:data:`STALL_SECONDS` without a byte: exit 28), a few retries of transient errors."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "pipe":  # only ever from the user's own config or command line (join never returns one)
        return ["/bin/sh", "-c", url[len("pipe:") :]]
    if scheme in ("http", "https"):
        return [
            "curl",
            "--globoff",
            "--proto",
            "=http,https",
            "--proto-redir",
            "=http,https",
            "--max-redirs",
            "5",
            "--fail",
            "--silent",
            "--location",
            "--connect-timeout",
            f"{CONNECT_SECONDS:g}",
            "--speed-limit",
            "1",
            "--speed-time",
            f"{max(1, round(STALL_SECONDS))}",
            "--retry",
            "2",
            "--retry-delay",
            "1",
            "--",
            url,
        ]
    if scheme == "gs":
        return ["gsutil", "-q", "cat", "--", url]
    if scheme == "s3":
        return ["aws", "s3", "cp", "--only-show-errors", url, "-"]
    raise ValueError(
        f"{url}: URLs with the scheme {scheme!r} cannot be read; use "
        + ", ".join(f"{s}://" for s in MANIFEST_URL_SCHEMES)
        + ", pipe:COMMAND or a local path."
    )


def _explain(tool: str, status: int) -> str:
    if tool == "curl" and status in _CURL_STATUS:
        return f"curl exit status {status}: {_CURL_STATUS[status]}"
    if tool in ("gsutil", "aws") and status == 1:
        return f"{tool} exit status 1: object missing, no access or no credentials (run the command by hand to see)"
    if status < 0:
        return f"{tool} killed by signal {-status}"
    return f"{tool} exit status {status}"


class RemoteStream:
    """Binary read stream of one URL (the output of :func:`remote_command`), the tool's exit status checked at the end.

    ``tee_to``: also write the bytes into this cache file; :meth:`finish` reads the rest, checks ``size`` and
    ``sha256`` (when given) and renames the temporary file into place. :meth:`close` without a successful
    :meth:`finish` (an error, a cut transfer, an abandoned read) deletes the temporary file.
    """

    def __init__(
        self, url: str, tee_to: Path | None = None, size: int | None = None, sha256: str | None = None
    ) -> None:
        self.url, self.tool = url, _tool(url)
        self.bytes_read = 0
        self._eof = self._closed = False
        command = remote_command(url)
        if self.tool != "shell command" and shutil.which(command[0]) is None:  # fail loudly, not "file missing"
            raise RuntimeError(
                f"Cannot read {url}: {url.split(':', 1)[0]} URLs are read with `{self.tool}`, which is not on PATH. "
                "Install it (and its credentials), or copy the data locally."
            )
        self._proc = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, bufsize=1 << 16)
        assert self._proc.stdout is not None
        self._raw: IO[bytes] = self._proc.stdout
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
        status = self._proc.wait()
        if status == 0:
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
        if self._proc.poll() is None:
            self._proc.kill()  # an abandoned read: do not wait for the rest of a large file
        try:
            self._raw.close()
        except OSError:
            pass
        self._proc.wait()

    def __enter__(self) -> RemoteStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from garbage collection
            pass


def read_bytes(location: Location, max_bytes: int | None = None) -> bytes:
    """The whole content of a local file or URL (raises OSError, :class:`RemoteNotFoundError` for a 404). With
    ``max_bytes``, a larger file is an ``OSError`` before more than that is read."""
    if not is_url(location):
        path = Path(location)
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise OSError(f"{path} is {path.stat().st_size} bytes, more than the {max_bytes} allowed")
        return path.read_bytes()
    with RemoteStream(str(location)) as stream:
        chunks, total = [], 0
        while chunk := stream.read(1 << 20):
            total += len(chunk)
            if max_bytes is not None and total > max_bytes:
                raise RemoteReadError(str(location), f"more than the {max_bytes} bytes allowed for this file")
            chunks.append(chunk)
        return b"".join(chunks)


def cache_file(cache_dir: str | Path, url: str, sha256: str | None = None) -> Path:
    """The cache file of a remote shard: named by URL and content hash, so a re-prepared shard is fetched again."""
    key = hashlib.sha256(f"{url}\n{sha256 or ''}".encode()).hexdigest()[:20]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", basename(url))[-80:] or "shard"
    return Path(cache_dir).expanduser() / f"{key}-{name}"

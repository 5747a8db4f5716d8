"""Per-worker access to shards for random reads: open files and indexes bounded in number, remote shards fetched
whole into a cache bounded in bytes, with a bounded number of transfers.

Why it is built this way:
- A global epoch order reads single frames from many shards; a worker keeps at most ``max_open_files`` shards open
  (least recently used closed first) with their indexes (surgenet_ssl.data.shard_index), so its memory and file
  descriptors do not grow with the number of shards.
- A remote shard is fetched whole before it is read (random access needs a local copy): into ``cache_dir`` when
  given (shared by the workers of a node, checked against the manifest's size and sha256, renamed into place when
  complete, oldest files evicted beyond ``cache_bytes``), else into an anonymous temporary file that disappears when
  it is closed (at most ``cache_bytes`` of them held per worker).
- Transfers run in a pool of ``max_transfers`` threads, also when a read waits for one: a worker never has more
  remote transfers open, whatever the number of sources. :meth:`prefetch` queues the shards the worker reads next.
- A 404 raises ``FileNotFoundError``; a transfer cut mid-way keeps the bytes received, unlinked (never in the
  cache), so the frames before the cut are used like those of a truncated local shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from surgenet_ssl.data import location as L
from surgenet_ssl.data.shard_index import ShardIndex, load_index, read_members, scan_tar

__all__ = ["OpenShard", "ShardStore"]

log = logging.getLogger(__name__)


@dataclass
class OpenShard:
    """An open shard: its file, its index, and where its bytes came from."""

    file: IO[bytes]
    index: ShardIndex
    size: int
    damage: str | None = None  # why a remote copy is incomplete (a transfer cut mid-way)

    def read(self, i: int, extensions: tuple[str, ...]) -> dict[str, bytes]:
        return read_members(self.file, self.index, i, extensions)


class _Fetched:
    """A remote shard's local bytes: a path in the cache, or an open unlinked temporary file (no cache, or cut)."""

    def __init__(self, path: Path | None = None, file: IO[bytes] | None = None, damage: str | None = None) -> None:
        self.path, self.file, self.damage = path, file, damage


class ShardStore:
    def __init__(
        self,
        cache_dir: str | Path | None = None,
        cache_bytes: int = 16 << 30,
        max_open_files: int = 64,
        max_transfers: int = 4,
    ) -> None:
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.cache_bytes = max(1, int(cache_bytes))
        self.max_open_files = max(1, int(max_open_files))
        self.max_transfers = max(1, int(max_transfers))
        self._open: OrderedDict[str, OpenShard] = OrderedDict()
        self._pending: dict[str, Future[_Fetched]] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.transfers_open = 0  # now, in this process
        self.transfers_peak = 0  # the most ever open at once (tests and the benchmark read it)
        self.fetched = 0

    # --------------------------------------------------------------------------------------------- reading
    def open(self, location: L.Location, size: int | None = None, sha256: str | None = None) -> OpenShard:
        """The open shard (from the LRU, or opened now). Raises FileNotFoundError (missing / 404), ``OSError`` or
        ``tarfile.ReadError`` (unreadable: not a tar, a failed transfer before any byte)."""
        name = str(location)
        entry = self._open.get(name)
        if entry is not None:
            self._open.move_to_end(name)
            return entry
        damage = None
        if L.is_url(location):
            fetched = self._fetch_wait(name, size, sha256)
            damage = fetched.damage
            if fetched.file is not None:
                f = fetched.file
                index = scan_tar(fileobj=f)
                index.complete = index.complete and damage is None
            else:
                cached = fetched.path
                assert cached is not None
                f = open(cached, "rb")  # noqa: SIM115 - kept open in the LRU
                with contextlib.suppress(OSError):
                    os.utime(cached)  # recently used: evicted last
                index = _index_or_close(f, lambda: load_index(cached, fileobj=f))
        else:
            path = Path(location)
            f = open(path, "rb")  # noqa: SIM115 - kept open in the LRU
            index = _index_or_close(f, lambda: load_index(path, self.cache_dir / "index" if self.cache_dir else None))
        entry = OpenShard(f, index, os.fstat(f.fileno()).st_size, damage)
        self._open[name] = entry
        self._shrink()
        return entry

    def _shrink(self) -> None:
        """Close least recently used shards beyond ``max_open_files`` (and, for anonymous remote copies, beyond
        ``cache_bytes`` of them)."""
        while len(self._open) > self.max_open_files or (
            len(self._open) > 1 and self._anonymous_bytes() > self.cache_bytes
        ):
            _, old = self._open.popitem(last=False)
            old.file.close()

    def _anonymous_bytes(self) -> int:
        return sum(e.size for e in self._open.values() if not _has_name(e.file))

    def close(self) -> None:
        for entry in self._open.values():
            entry.file.close()
        self._open.clear()
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for fut in pending:
            fut.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for fut in pending:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                got = fut.result()
                if got.file is not None:
                    got.file.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # --------------------------------------------------------------------------------------------- remote
    def is_open(self, location: L.Location) -> bool:
        return str(location) in self._open

    def prefetch(self, shards: list[tuple[str, int | None, str | None]]) -> None:
        """Queue transfers of the remote shards ``(url, size, sha256)`` that are neither open, cached nor queued."""
        for url, size, sha256 in shards:
            if url in self._open or not L.is_url(url):
                continue
            if self.cache_dir is not None and L.cache_file(self.cache_dir, url, sha256).is_file():
                continue
            self._submit(url, size, sha256)

    def _submit(self, url: str, size: int | None, sha256: str | None) -> Future[_Fetched]:
        with self._lock:
            fut = self._pending.get(url)
            if fut is None:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.max_transfers, thread_name_prefix="shard-fetch")
                fut = self._pool.submit(self._fetch, url, size, sha256)
                self._pending[url] = fut
            return fut

    def _fetch_wait(self, url: str, size: int | None, sha256: str | None) -> _Fetched:
        if self.cache_dir is not None:
            cached = L.cache_file(self.cache_dir, url, sha256)
            if cached.is_file():
                return _Fetched(path=cached)
        fut = self._submit(url, size, sha256)
        try:
            return fut.result()
        finally:
            with self._lock:
                if self._pending.get(url) is fut:
                    del self._pending[url]

    def _fetch(self, url: str, size: int | None, sha256: str | None) -> _Fetched:
        """Fetch ``url`` whole (in a pool thread). A cut transfer returns the bytes received, unlinked."""
        with self._lock:
            self.transfers_open += 1
            self.transfers_peak = max(self.transfers_peak, self.transfers_open)
        try:
            return self._transfer(url, size, sha256)
        finally:
            with self._lock:
                self.transfers_open -= 1
                self.fetched += 1

    def _transfer(self, url: str, size: int | None, sha256: str | None) -> _Fetched:
        where = self.cache_dir if self.cache_dir is not None else Path(tempfile.gettempdir())
        where.mkdir(parents=True, exist_ok=True)
        target = L.cache_file(self.cache_dir, url, sha256) if self.cache_dir is not None else None
        fd, tmp_name = tempfile.mkstemp(prefix=".fetch-", suffix=".part", dir=where)
        tmp = Path(tmp_name)
        f = os.fdopen(fd, "w+b")
        digest, received = hashlib.sha256(), 0
        try:
            with L.RemoteStream(url) as stream:
                try:
                    while chunk := stream.read(1 << 20):
                        f.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                except FileNotFoundError:
                    raise
                except OSError as e:
                    if received == 0:
                        raise
                    log.debug("transfer of %s cut after %d bytes (%s): using the frames received", url, received, e)
                    f.flush()
                    tmp.unlink()
                    why = getattr(e, "reason", None) or str(e)
                    return _Fetched(file=f, damage=why)  # never cached; the reader sees a truncated tar
            f.flush()
            complete = (size is None or received == int(size)) and (not sha256 or digest.hexdigest() == sha256)
            if target is None or not complete:
                if target is not None:
                    log.warning("not caching %s: it differs from the manifest (size or sha256)", url)
                tmp.unlink()
                return _Fetched(file=f)
            f.close()
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)  # a cache shared by the workers (and users) of a node
            os.replace(tmp, target)
            self._evict(keep=target)
            return _Fetched(path=target)
        except BaseException:
            if not f.closed:
                f.close()
            tmp.unlink(missing_ok=True)
            raise

    def _evict(self, keep: Path) -> None:
        """Delete the least recently used cached shards beyond ``cache_bytes`` (open copies stay readable)."""
        assert self.cache_dir is not None
        files = []
        for p in self.cache_dir.iterdir():
            if p.name.startswith(".") or not p.is_file() or p == keep:
                continue
            with contextlib.suppress(OSError):
                st = p.stat()
                files.append((st.st_mtime, st.st_size, p))
        total = sum(s for _, s, _ in files) + keep.stat().st_size
        for _, s, p in sorted(files):
            if total <= self.cache_bytes:
                break
            with contextlib.suppress(OSError):
                p.unlink()
                total -= s


def _has_name(f: IO[bytes]) -> bool:
    """True for a file opened by path (a local shard or a cached copy), False for an unlinked temporary file."""
    return isinstance(getattr(f, "name", None), str)


def _index_or_close(f: IO[bytes], build: Callable[[], ShardIndex]) -> ShardIndex:
    try:
        return build()
    except BaseException:
        f.close()
        raise

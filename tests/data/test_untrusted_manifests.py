"""Manifests are data: names in them never run a command or leave their source; remote reads are bounded; a bad
field fails at start, named (README "Security model")."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import to_tensor

from data.data_media import write_source
from surgenet_ssl.data import location as L
from surgenet_ssl.data.loader import build_train_loader
from surgenet_ssl.data.manifest_schema import ManifestSchemaError
from surgenet_ssl.data.mixture import check_dataset_config, resolve_mixture
from surgenet_ssl.data.shards import write_json_atomic

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="http(s) URLs are read with curl")


def two_crops(img: Image.Image) -> list[torch.Tensor]:
    return [to_tensor(img), to_tensor(img.resize((4, 4)))]


def custom(path: str) -> dict[str, Any]:
    return {"name": "custom", "path": path}


def _with_shard_file(src: Path, out: Path, name: str) -> Path:
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["shards"][0]["file"] = name
    write_json_atomic(out / "manifest.json", manifest)
    return out


@pytest.mark.parametrize(
    "name",
    [
        "pipe:touch {marker}; cat {shard}",  # a command
        "shards/a.tar; touch {marker}",  # shell characters appended to a pipe: base
        "$(touch {marker})",
        "../p/shards/v00-00000.tar",  # out of the source folder
        "{shard}",  # an absolute local path
        "shards/../../x.tar",
        "ftp://host/x.tar",
        "file:///etc/passwd",
        "-oProxyCommand=x",
        "x[1-9999].tar",  # a curl glob
        "shards/.hidden.tar",
    ],
)
def test_a_manifest_name_that_breaks_the_rule_fails_at_start_and_runs_nothing(tmp_path: Path, name: str) -> None:
    src = write_source(tmp_path, "p", videos=1, frames_per_video=4, shard_max=2)
    marker = tmp_path / "ran"
    bad = name.format(marker=marker, shard=src / "shards" / "v00-00000.tar")
    evil = _with_shard_file(src, tmp_path / "evil", bad)
    for base in (str(evil), f"pipe:cat {evil}"):  # a local source, and one read through the user's own command
        with pytest.raises(ManifestSchemaError) as err:
            loader = build_train_loader(custom(base), "/unused", two_crops, 2, 0, steps_per_epoch=2, shuffle_buffer=0)
            list(loader)
        msg = str(err.value)
        assert "manifest.json" in msg and "shards[0].file" in msg and repr(bad) in msg and "never a pipe:" in msg
    # with allow_missing too: a bad manifest is not a "missing source" to skip
    with pytest.raises(ManifestSchemaError):
        resolve_mixture({"name": "x", "sources": {"p": {"path": str(evil)}}, "allow_missing": True}, "/unused")
    assert not marker.exists()


def test_collection_manifests_name_their_sources_by_relative_folders_only(tmp_path: Path) -> None:
    write_source(tmp_path, "p", videos=1, frames_per_video=4, shard_max=2)
    marker = tmp_path / "ran"
    collection = {"format": "surgenet-ssl/collection", "version": 1}
    for rel in (f"pipe:touch {marker}", "../elsewhere", str(tmp_path / "p")):
        write_json_atomic(tmp_path / "manifest.json", collection | {"sources": {"p": rel}})
        with pytest.raises(ManifestSchemaError, match=r"sources\.p: .* is not allowed"):
            resolve_mixture(custom(str(tmp_path)), "/unused")
    write_json_atomic(tmp_path / "manifest.json", collection | {"sources": {"p": "p"}})
    assert [s.name for s in resolve_mixture(custom(str(tmp_path)), "/unused").sources] == ["p"]
    assert not marker.exists()


def test_names_prepare_writes_and_absolute_urls_are_accepted() -> None:
    for ok in ("shards/v00-00000.tar", "shards/Case_12__left-00003.tar", "a.b+c/d_e.tar", "https://h:8/x/a.tar?s=1"):
        assert L.check_manifest_name(ok) == ok
    assert L.join("pipe:cat /d/src", "shards/a.tar") == "pipe:cat /d/src/shards/a.tar"
    # a trusted name (the user's own source name) joined to the user's command is quoted, never spliced
    assert L.join("pipe:cat /d", "my source; x", trusted=True) == "pipe:cat /d/'my source; x'"
    with pytest.raises(L.UnsafeNameError):
        L.join("/d", "../x")
    with pytest.raises(L.UnsafeNameError):
        L.join("http://h/d", "pipe:id")


@pytest.mark.parametrize(
    ("change", "field", "expected"),
    [
        (lambda m: m["shards"][0].pop("file"), "shards[0].file", "relative to the manifest"),
        (lambda m: m["shards"][0].update(file=123), "shards[0].file", "expected a string"),
        (lambda m: m.update(frames="four"), "frames = 'four'", "an integer >= 0"),
        (lambda m: m.update(version="1.0"), "version = '1.0'", "an integer from 1"),
        (lambda m: m.update(shards="shards/a.tar"), "shards = 'shards/a.tar'", "a list of shard entries"),
        (lambda m: m["shards"][0].update(frames=-1), "shards[0].frames = -1", "an integer >= 0"),
        (lambda m: m["shards"][1].update(sha256="xyz"), "shards[1].sha256 = 'xyz'", "64 lower-case hex"),
        (lambda m: m.update(complete="yes"), "complete = 'yes'", "true or false"),
        (lambda m: m["shards"].__setitem__(0, "a.tar"), "shards[0] = 'a.tar'", "an object"),
        (lambda m: m.update(frame_sizes={"569": 3}), "frame_sizes = '569'", "<width>x<height>"),
        (lambda m: m.update(frame_sizes={"569x320": -3}), "frame_sizes.569x320 = -3", "an integer >= 0"),
    ],
)
def test_manifest_fields_are_checked_and_named(tmp_path: Path, change: Any, field: str, expected: str) -> None:
    src = write_source(tmp_path, "p", videos=1, frames_per_video=4, shard_max=2)
    manifest = json.loads((src / "manifest.json").read_text())
    change(manifest)
    write_json_atomic(src / "manifest.json", manifest)
    with pytest.raises(ManifestSchemaError) as err:
        resolve_mixture(custom(str(src)), "/unused")
    msg = str(err.value)
    assert str(src / "manifest.json") in msg and field in msg and expected in msg and "rerun prepare" in msg


def test_an_oversized_manifest_is_refused_before_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import surgenet_ssl.data.shards as S

    src = write_source(tmp_path, "p", videos=1, frames_per_video=4, shard_max=2)
    monkeypatch.setattr(S, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(Exception, match=r"more than any manifest \(100 at most\)"):
        resolve_mixture({"name": "x", "sources": {"p": {"path": str(src)}}}, "/unused")


@pytest.mark.parametrize("key", ["path", "root"])
def test_an_unreadable_url_scheme_is_a_config_error(key: str) -> None:
    with pytest.raises(ValueError, match=rf"dataset\.{key}: ftp://h/d: URLs with the scheme 'ftp' cannot be read"):
        check_dataset_config({"name": "x", key: "ftp://h/d", "sources": {"a": None}})
    with pytest.raises(ValueError, match=r"dataset\.sources\.a\.path: foo://x"):
        check_dataset_config({"name": "x", "sources": {"a": {"path": "foo://x"}}})


# ------------------------------------------------------------------------------------------------ bounded transfers
class _Counting(threading.Thread):
    """A loopback HTTP server that counts requests; with ``silent``, it accepts and never answers."""

    def __init__(self, silent: bool) -> None:
        super().__init__(daemon=True)
        self.silent, self.requests, self.stop = silent, 0, threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.requests += 1
            if self.silent:
                self.held.append(conn)  # never answer
            else:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                conn.close()


@pytest.fixture
def http_server(request: pytest.FixtureRequest) -> Iterator[_Counting]:
    server = _Counting(silent=request.param)
    server.start()
    yield server
    server.stop.set()
    server.join()
    for conn in server.held:
        conn.close()
    server.sock.close()


@needs_curl
@pytest.mark.parametrize("http_server", [False], indirect=True)
def test_a_url_is_never_a_glob(http_server: _Counting) -> None:
    with pytest.raises(L.RemoteNotFoundError):
        L.read_bytes(f"{http_server.url}/x[1-200].tar")
    assert http_server.requests == 1  # curl without --globoff makes 200 requests


@needs_curl
@pytest.mark.parametrize("http_server", [True], indirect=True)
def test_a_server_that_never_answers_fails_the_read(http_server: _Counting, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(L, "STALL_SECONDS", 1.0)
    start = time.monotonic()
    with pytest.raises(L.RemoteReadError, match="timed out"):
        L.read_bytes(f"{http_server.url}/manifest.json")
    assert time.monotonic() - start < 30  # 3 tries of a 1-second stall limit (the default is 60 s a try)


def test_redirects_and_protocols_are_limited_to_http() -> None:
    command = L.remote_command("https://h/x.tar")
    assert command[0] == "curl" and command[-2:] == ["--", "https://h/x.tar"]
    for flag in ("--globoff", "--speed-time", "--connect-timeout", "--fail"):
        assert flag in command
    assert command[command.index("--proto") + 1] == "=http,https"
    assert command[command.index("--proto-redir") + 1] == "=http,https"
    assert L.remote_command("s3://b/k") == ["aws", "s3", "cp", "--only-show-errors", "s3://b/k", "-"]
    with pytest.raises(ValueError, match="scheme 'ftp' cannot be read"):
        L.remote_command("ftp://h/x")

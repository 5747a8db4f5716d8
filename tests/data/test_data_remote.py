"""Sources at URLs: loopback HTTP (curl), 404 and cut shards, the shard cache, remote manifests, pipe:."""

from __future__ import annotations

import logging
import re
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import to_tensor

from data.data_media import write_source
from support.cli import FAST_TRAIN, TINY_BACKBONE_ARGS, run_module
from surgenet_ssl.data import location as L
from surgenet_ssl.data.loader import build_train_loader
from surgenet_ssl.data.mixture import MissingSourcesError
from surgenet_ssl.data.shards import write_json_atomic

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="http(s) URLs are read with curl")

GOOD, MISSING, CUT = (
    ["/src/shards/v00-00000.tar", "/src/shards/v00-00003.tar", "/src/shards/v00-00004.tar"],
    "/src/shards/v00-00001.tar",
    "/src/shards/v00-00002.tar",
)


def two_crops(img: Image.Image) -> list[torch.Tensor]:
    return [to_tensor(img), to_tensor(img.resize((4, 4)))]


class _Server(ThreadingHTTPServer):
    """Serves ``root`` on 127.0.0.1; paths in ``not_found`` answer 404, paths in ``cut`` stop after half the bytes."""

    daemon_threads = True
    request_queue_size = 64  # the loader opens several shards at once

    def __init__(self, root: Path) -> None:
        self.root, self.requests, self.lock = root, Counter(), threading.Lock()
        self.not_found: set[str] = set()
        self.cut: set[str] = set()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(SimpleHTTPRequestHandler):
    server: _Server

    def __init__(self, request, client_address, server: _Server) -> None:  # noqa: ANN001
        super().__init__(request, client_address, server, directory=str(server.root))

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        with self.server.lock:
            self.server.requests[path] += 1
        if path in self.server.not_found:
            self.send_error(404)
        elif path in self.server.cut:
            data = (self.server.root / path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))  # the full length, then half the bytes
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
        else:
            super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


def serve(root: Path) -> Iterator[_Server]:
    server = _Server(root)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """curl must talk to the test server directly, never through a proxy from the environment."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("served")
    write_source(root, "src", videos=1, frames_per_video=25, shard_max=5)  # 5 shards of 5 frames
    write_source(root, "b", videos=1, frames_per_video=6, shard_max=3)
    return root


@pytest.fixture()
def server(prepared: Path) -> Iterator[_Server]:
    yield from serve(prepared)


def custom(path: str) -> dict:
    return {"name": "custom", "path": path}


def test_locations_join_urls_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert L.join("http://h:1/data/src", "shards/a.tar") == "http://h:1/data/src/shards/a.tar"
    assert L.join("http://h/data/src/", "manifest.json") == "http://h/data/src/manifest.json"
    assert L.join("https://h/src?sig=1", "a.tar") == "https://h/src/a.tar?sig=1"
    assert L.join("s3://bucket/pre", "x.tar") == "s3://bucket/pre/x.tar"
    assert L.join("pipe:cat /d/src", "shards/a.tar") == "pipe:cat /d/src/shards/a.tar"
    assert L.join(tmp_path, "a.tar") == tmp_path / "a.tar"
    assert L.join(tmp_path, "gs://b/x.tar") == "gs://b/x.tar"  # an absolute URL in a manifest wins
    assert L.as_location("http://h/x") == "http://h/x" and L.as_location("~/x") == Path("~/x").expanduser()
    assert L.as_location("file:///tmp/x") == Path("/tmp/x") and not L.is_url("file:///tmp/x")
    assert L.basename("http://h/data/src/") == "src" and L.basename("pipe:cat /d/src") == "src"
    monkeypatch.setenv("PATH", str(tmp_path))  # no curl/gsutil/aws: a clear error, not a "missing file"
    for url, tool in [("http://127.0.0.1:9/x", "curl"), ("gs://b/x", "gsutil"), ("s3://b/x", "aws")]:
        with pytest.raises(RuntimeError, match=f"read with `{tool}`"):
            L.read_bytes(url)


@needs_curl
def test_http_source_streams_and_bad_shards_are_counted(server: _Server, caplog: pytest.LogCaptureFixture) -> None:
    server.not_found.add(MISSING)
    server.cut.add(CUT)
    with caplog.at_level(logging.WARNING):
        loader = build_train_loader(
            custom(f"{server.url}/src"),
            "/unused",
            two_crops,
            batch_size=4,
            num_workers=0,
            steps_per_epoch=40,
            shuffle_buffer=8,
        )
        assert loader.dataset.sources == ["src"] and loader.dataset.frames_per_source == {"src": 25}
        batches = list(loader)
    assert len(batches) == 40 and all(len(b["key"]) == 4 for b in batches)  # training went on
    stats = loader.dataset.stats
    assert stats["unreadable_shards"] == 1 and stats["truncated_shards"] >= 1 and stats["samples"] == 160
    assert f"shard {server.url}{MISSING} of source src is missing" in caplog.text and "404" in caplog.text
    assert f"shard {server.url}{CUT} of source src is damaged" in caplog.text
    keys = {k for b in batches for k in b["key"]}
    assert not keys & {f"src/v00/{i:08d}" for i in range(5, 10)}  # the 404 shard
    assert keys & {f"src/v00/{i:08d}" for i in range(10, 13)}  # frames before the cut are used
    assert server.requests[MISSING] == 1  # dropped from sampling after the 404


@needs_curl
def test_shard_cache_keeps_complete_shards_only(server: _Server, tmp_path: Path, prepared: Path) -> None:
    server.not_found.add(MISSING)
    server.cut.add(CUT)
    cache = tmp_path / "cache"
    kw = {"batch_size": 4, "steps_per_epoch": 30, "shuffle_buffer": 8, "shard_cache_dir": cache}
    loader = build_train_loader(custom(f"{server.url}/src"), "/unused", two_crops, num_workers=0, **kw)
    list(loader)
    files = sorted(cache.iterdir())
    assert not [f for f in files if f.name.startswith(".") or f.suffix == ".part"]  # no partial download left
    assert sorted(f.name.split("-", 1)[1] for f in files) == sorted(p.rsplit("/", 1)[1] for p in GOOD)
    for f in files:  # the cached copies are the shards, byte for byte
        assert f.read_bytes() == (prepared / "src" / "shards" / f.name.split("-", 1)[1]).read_bytes()
    before = Counter(server.requests)
    again = build_train_loader(custom(f"{server.url}/src"), "/unused", two_crops, num_workers=2, **kw)
    assert sum(len(b["key"]) for b in again) == 120
    assert all(server.requests[p] == before[p] for p in GOOD)  # read from the cache
    assert server.requests[CUT] > before[CUT]  # a cut shard is never cached: fetched again
    assert again.dataset.stats["truncated_shards"] >= 1
    assert sorted(cache.iterdir()) == files


@needs_curl
def test_missing_remote_manifests_name_the_url(server: _Server, prepared: Path) -> None:
    with pytest.raises(MissingSourcesError, match=f"{server.url}/nope/manifest.json.*404") as err:
        build_train_loader(custom(f"{server.url}/nope"), "/unused", two_crops, 4, 0)
    assert f"No prepared source found at {server.url}/nope" in str(err.value)
    named = {"name": "two", "sources": {"src": None, "gone": None}, "root": server.url}
    with pytest.raises(MissingSourcesError) as err:
        build_train_loader(named, "/unused", two_crops, 4, 0)
    msg = str(err.value)
    assert "  - gone: not prepared (no manifest.json at" in msg and f"expected: {server.url}/gone/manifest.json" in msg
    assert f"then upload that directory to {server.url}/gone" in msg and "src:" not in msg
    loader = build_train_loader(
        named | {"allow_missing": True}, "/unused", two_crops, 4, 0, steps_per_epoch=2, shuffle_buffer=4
    )
    assert loader.dataset.sources == ["src"] and len(list(loader)) == 2
    # A collection manifest at the URL lists its sources (a remote folder cannot be listed); per-source URLs work.
    write_json_atomic(
        prepared / "manifest.json",
        {"format": "surgenet-ssl/collection", "version": 1, "sources": {"src": "src", "b": "b"}},
    )
    try:
        both = build_train_loader(custom(server.url), "/unused", two_crops, 4, 0, steps_per_epoch=3, shuffle_buffer=4)
        assert both.dataset.frames_per_source == {"src": 25, "b": 6} and len(list(both)) == 3
    finally:
        (prepared / "manifest.json").unlink()
    per_source = {"name": "x", "sources": {"b": {"weight": 1.0, "path": f"{server.url}/b"}}, "root": "/nowhere"}
    assert build_train_loader(per_source, "/unused", two_crops, 4, 0).dataset.frames_per_source == {"b": 6}


def test_pipe_sources_from_the_config_and_failing_commands(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = write_source(tmp_path, "p", videos=1, frames_per_video=6, shard_max=2)
    loader = build_train_loader(
        custom(f"pipe:cat {src}"),
        "/unused",
        two_crops,
        batch_size=3,
        num_workers=0,
        steps_per_epoch=8,
        shuffle_buffer=0,
    )
    keys = {k for b in loader for k in b["key"]}
    assert keys == {f"p/v00/{i:08d}" for i in range(6)} and loader.dataset.stats["unreadable_shards"] == 0
    # One shard's command fails (cat exits 1): counted and named, training goes on with the others.
    (src / "shards" / "v00-00001.tar").unlink()
    with caplog.at_level(logging.WARNING):
        loader = build_train_loader(
            custom(f"pipe:cat {src}"),
            "/unused",
            two_crops,
            batch_size=2,
            num_workers=0,
            steps_per_epoch=10,
            shuffle_buffer=0,
        )
        keys = {k for b in loader for k in b["key"]}
    assert keys == {f"p/v00/{i:08d}" for i in (0, 1, 4, 5)}
    assert loader.dataset.stats["unreadable_shards"] == 1
    assert f"pipe:cat {src}/shards/v00-00001.tar" in caplog.text and "exit status 1" in caplog.text
    with pytest.raises(MissingSourcesError, match=re.escape(f"pipe:cat {tmp_path}/none/manifest.json")):
        build_train_loader(custom(f"pipe:cat {tmp_path / 'none'}"), "/unused", two_crops, 2, 0)


@needs_curl
@pytest.mark.slow
def test_train_cli_on_an_http_dataset(demo_cache: Path, tmp_path: Path) -> None:
    from surgenet_ssl.data.demo import ensure_demo_dataset

    demo = ensure_demo_dataset(demo_cache)  # a collection of 3 sources (the k-NN monitor reads them over HTTP too)
    for server in serve(demo):
        cache, run_dir = tmp_path / "shard_cache", tmp_path / "run"
        proc = run_module(
            "surgenet_ssl.train",
            "dataset=custom",
            f"dataset.path={server.url}",
            f"data.shard_cache_dir={cache}",
            f"hydra.run.dir={run_dir}",
            *FAST_TRAIN,
            *TINY_BACKBONE_ARGS,
            "trainer.max_epochs=1",
            cache=demo_cache,
            env={
                "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost",
                "http_proxy": "",
                "HTTP_PROXY": "",
            },
        )
        assert proc.stdout.strip().splitlines()[-1] == f"export_dir={run_dir / 'export'}"
        assert any(p.endswith(".tar") for p in server.requests) and server.requests["/manifest.json"] >= 1
        assert list(cache.glob("*.tar")) and not list(cache.glob(".*"))

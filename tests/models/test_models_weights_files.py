"""Weight files from the network and from disk: torch.hub's hash-checked download against a loopback server (no
network), the cache, and a clear message for truncated files."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from surgenet_ssl.models import read_state_dict
from surgenet_ssl.models import weights as weights_mod


@pytest.fixture()
def server(tmp_path):
    """A bounded HTTP server on 127.0.0.1 serving tmp_path/served; yields (base URL, folder, request paths)."""
    served = tmp_path / "served"
    served.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args, **kwargs) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            requests.append(self.path)
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", served, requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _weights(path: Path) -> str:
    torch.manual_seed(0)
    torch.save({"stem.weight": torch.randn(8, 3), "norm.bias": torch.zeros(8)}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_goes_through_torch_hub_helper_with_the_hash_prefix(monkeypatch, server, isolated_weight_cache):
    base, served, requests = server
    digest = _weights(served / "teacher.pth")
    calls = []
    real = torch.hub.download_url_to_file

    def spy(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix, progress))
        return real(url, dst, hash_prefix=hash_prefix, progress=progress)

    monkeypatch.setattr(torch.hub, "download_url_to_file", spy)
    url = f"{base}/teacher.pth"
    for _ in range(2):
        sd = read_state_dict(url, sha256=digest.upper())  # any case, full digest or prefix
        assert torch.equal(sd["norm.bias"], torch.zeros(8))
    assert calls == [(url, digest, False)]  # once: the second read is from the cache
    assert requests == ["/teacher.pth"]
    cached = [p for p in isolated_weight_cache.rglob("*") if p.is_file()]
    assert [p.name for p in cached] == ["teacher.pth"]  # no temporary file left behind


def test_wrong_hash_raises_and_leaves_no_file(server, isolated_weight_cache):
    base, served, requests = server
    _weights(served / "teacher.pth")
    with pytest.raises(RuntimeError, match="sha256 mismatch .* nothing was cached"):
        read_state_dict(f"{base}/teacher.pth", sha256="0" * 64)
    assert requests == ["/teacher.pth"]
    assert not [p for p in isolated_weight_cache.rglob("*") if p.is_file()]  # no file, no .partial
    # torch.hub naming convention (name-<sha256 prefix>.ext) is checked the same way
    shutil.copyfile(served / "teacher.pth", served / "teacher-deadbeef.pth")
    with pytest.raises(RuntimeError, match="expected deadbeef"):
        read_state_dict(f"{base}/teacher-deadbeef.pth")
    assert not [p for p in isolated_weight_cache.rglob("*") if p.is_file()]


def test_bad_cached_copy_is_replaced_and_a_failed_refetch_caches_nothing(server, isolated_weight_cache):
    base, served, requests = server
    digest = _weights(served / "teacher.pth")
    url = f"{base}/teacher.pth"
    path = weights_mod.download_weights(url, sha256=digest)
    path.write_bytes(b"damaged")  # e.g. a disk error after caching
    assert weights_mod.download_weights(url, sha256=digest).read_bytes() == (served / "teacher.pth").read_bytes()
    path.write_bytes(b"damaged")
    (served / "teacher.pth").write_bytes(b"changed upstream")
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        weights_mod.download_weights(url, sha256=digest)
    assert not [p for p in isolated_weight_cache.rglob("*") if p.is_file()]
    assert len(requests) == 3


def test_unreachable_url_is_a_clear_error(server, isolated_weight_cache):
    base, _, _ = server
    with pytest.raises(RuntimeError, match="Could not download weights .*404"):
        read_state_dict(f"{base}/missing.pth")
    assert not [p for p in isolated_weight_cache.rglob("*") if p.is_file()]


@pytest.mark.parametrize("keep", [0, 0.01, 0.5, 0.99])
def test_truncated_pth_says_truncated_or_corrupt_first(tmp_path, keep):
    full = tmp_path / "full.pth"
    _weights(full)
    data = full.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError) as info:
        read_state_dict(cut)
    message = str(info.value)
    assert message.startswith(f"Cannot read {cut}: file is truncated or corrupt"), message
    assert "pickled Python objects" not in message  # not the advice for intact files with unsafe pickles


def test_truncated_safetensors_says_truncated_or_corrupt(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="file is truncated or corrupt"):
        read_state_dict(path)


class _NotAllowed:
    pass


def test_intact_file_with_unsafe_objects_keeps_its_own_advice(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"w": torch.zeros(1), "obj": _NotAllowed()}, path)
    with pytest.raises(ValueError, match="weights_only=True") as info:
        read_state_dict(path)
    assert "truncated" not in str(info.value)

"""load_backbone_weights: every supported format loads the right tensors; every bad file raises."""

import argparse
import functools
import hashlib
import http.server
import shutil
import threading

import pytest
import torch
from safetensors.torch import save_file

from surgenet_ssl.backbones import build_backbone, surgenet_to_timm, timm_to_surgenet
from surgenet_ssl.models import (
    extract_backbone_state_dict,
    load_backbone_weights,
    read_state_dict,
)
from surgenet_ssl.models import weights as weights_mod


@pytest.fixture(scope="module")
def teacher():
    """A caformer_s18 'teacher' with recognisable weights, and a differently initialised 'student'."""
    torch.manual_seed(0)
    t = build_backbone("caformer_s18").eval()
    torch.manual_seed(1)
    s = build_backbone("caformer_s18").eval()
    return t, s


def fresh(backbone="caformer_s18"):
    torch.manual_seed(123)
    return build_backbone(backbone).eval()


def assert_same_weights(model, reference):
    ref = reference.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k


def dino_head_state(prefix=""):
    return {f"{prefix}head.mlp.0.weight": torch.randn(8, 512), f"{prefix}head.last_layer.weight_g": torch.ones(16, 1)}


def test_surgenet_named_teacher_pth_gives_identical_features(tmp_path, teacher):
    t, _ = teacher
    path = tmp_path / "SurgeNet_checkpoint_epoch0050_teacher.pth"
    torch.save(timm_to_surgenet(t.state_dict(), "caformer_s18"), path)
    model = fresh()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(model(x), t(x))
        report = load_backbone_weights(model, path, "caformer_s18")
        assert torch.equal(model(x), t(x))
    assert (report.loaded, report.missing, report.unexpected, report.skipped) == (152, [], [], 0)
    assert "surgenet naming" in report.format and str(path) in str(report)


def test_published_standin_loads_exact_values(published_files):
    model = fresh("convnextv2_tiny")
    report = load_backbone_weights(model, published_files["convnextv2_tiny"], "convnextv2_tiny")
    assert report.loaded == 198
    published = torch.load(published_files["convnextv2_tiny"], weights_only=True)
    sd = model.state_dict()
    assert torch.equal(sd["stages.2.blocks.4.mlp.grn.weight"], published["stages.2.4.grn.gamma"].flatten())
    assert torch.equal(sd["head.norm.bias"], published["norm.bias"])


def test_timm_named_safetensors(tmp_path, teacher):
    t, _ = teacher
    path = tmp_path / "teacher.safetensors"
    save_file(t.state_dict(), str(path))
    model = fresh()
    report = load_backbone_weights(model, path, "caformer_s18")
    assert report.loaded == 152 and "timm naming" in report.format
    assert_same_weights(model, t)


def test_full_dino_checkpoint_uses_teacher(tmp_path, teacher):
    t, s = teacher
    ckpt = {
        "student": {**{f"module.backbone.{k}": v for k, v in s.state_dict().items()}, **dino_head_state("module.")},
        "teacher": {**{f"backbone.{k}": v for k, v in t.state_dict().items()}, **dino_head_state()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "epoch": 50,
        "args": argparse.Namespace(arch="caformer_s18", out_dim=65536),  # the official code stores a Namespace
        "dino_loss": {"center": torch.zeros(1, 16)},
        "fp16_scaler": {"scale": 1024.0},
    }
    path = tmp_path / "SurgeNet_checkpoint0050.pth"
    torch.save(ckpt, path)
    model = fresh()
    report = load_backbone_weights(model, path, "caformer_s18")
    assert_same_weights(model, t)
    assert report.skipped == 2  # the DINO head
    assert report.format.startswith("dino_checkpoint[teacher]")
    sd, fmt = extract_backbone_state_dict(read_state_dict(path), "caformer_s18")
    assert set(sd) == set(t.state_dict()) and fmt == report.format


def test_lightning_checkpoint_prefers_teacher(tmp_path, teacher):
    t, s = teacher
    state = {
        **{f"student.backbone.{k}": v for k, v in s.state_dict().items()},
        **dino_head_state("student."),
        **{f"teacher.backbone.{k}": v for k, v in t.state_dict().items()},
        **dino_head_state("teacher."),
        "dino_loss.center": torch.zeros(1, 16),
    }
    ckpt = {
        "state_dict": state,
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "optimizer_states": [],
        "hyper_parameters": {"backbone": "caformer_s18", "lr": 5e-4},
    }
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    model = fresh()
    report = load_backbone_weights(model, path, "caformer_s18")
    assert_same_weights(model, t)
    assert report.loaded == 152
    assert report.format.startswith("lightning_checkpoint[state_dict], prefix 'teacher.', prefix 'backbone.'")


def test_lightning_checkpoint_without_teacher_falls_back_to_student(tmp_path, teacher, caplog):
    _, s = teacher
    path = tmp_path / "student_only.ckpt"
    torch.save(
        {
            "state_dict": {f"student.backbone.{k}": v for k, v in s.state_dict().items()},
            "pytorch-lightning_version": "2.4.0",
        },
        path,
    )
    model = fresh()
    load_backbone_weights(model, path, "caformer_s18")
    assert_same_weights(model, s)
    assert "using the student" in caplog.text


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"model": sd, "optimizer": {}, "epoch": 300},  # FB ConvNeXt style
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},  # DDP
        lambda sd: {"teacher": {f"backbone.{k}": v for k, v in sd.items()}},  # teacher-only DINO export
        lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},  # torch.compile
    ],
    ids=["model", "state_dict+module", "teacher+backbone", "compiled"],
)
def test_wrapped_and_prefixed_files_load_correctly(tmp_path, published_files, wrap):
    published = torch.load(published_files["pvt_v2_b2"], weights_only=True)
    path = tmp_path / "wrapped.pth"
    torch.save(wrap(published), path)
    model = fresh("pvt_v2_b2")
    report = load_backbone_weights(model, path, "pvt_v2_b2")
    assert report.loaded == 332
    expected = surgenet_to_timm(published, "pvt_v2_b2")
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_file_of_another_backbone_raises(published_files):
    with pytest.raises(ValueError, match="neither SurgeNet- nor timm-named caformer_s18"):
        load_backbone_weights(fresh(), published_files["convnextv2_tiny"], "caformer_s18")


def test_missing_tensor_raises_naming_it(tmp_path, published_files):
    published = torch.load(published_files["caformer_s18"], weights_only=True)
    del published["stages.2.3.mlp.fc1.weight"]
    path = tmp_path / "incomplete.pth"
    torch.save(published, path)
    with pytest.raises(ValueError, match=r"1 backbone tensor\(s\) missing.*stages\.2\.blocks\.3\.mlp\.fc1\.weight"):
        load_backbone_weights(fresh(), path, "caformer_s18")
    report = load_backbone_weights(fresh(), path, "caformer_s18", strict_backbone=False)
    assert report.missing == ["stages.2.blocks.3.mlp.fc1.weight"] and report.loaded == 151


def test_misshaped_tensor_raises_naming_it(published_files):
    published = torch.load(published_files["caformer_s18"], weights_only=True)
    published["stages.3.0.token_mixer.qkv.weight"] = torch.zeros(960, 512)
    with pytest.raises(ValueError, match=r"wrong shape.*stages\.3\.blocks\.0\.token_mixer\.qkv\.weight"):
        load_backbone_weights(fresh(), published, "caformer_s18", strict_backbone=False)


def test_imagenet_variant_file_into_surgenet_model_raises_with_hint():
    imagenet = build_backbone("caformer_s18", pretrained_variant="ImageNet").state_dict()
    with pytest.raises(ValueError, match="pretrained='ImageNet'"):
        load_backbone_weights(fresh(), timm_to_surgenet(imagenet, "caformer_s18"), "caformer_s18")


def test_nothing_loadable_raises_even_when_not_strict(teacher):
    with pytest.raises(ValueError):
        load_backbone_weights(fresh("pvt_v2_b2"), {"foo.weight": torch.zeros(1)}, "pvt_v2_b2", strict_backbone=False)
    with pytest.raises(ValueError, match="No tensors found"):
        load_backbone_weights(fresh(), {"epoch": 3, "args": {}}, "caformer_s18")


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"w": torch.zeros(1), "obj": functools.partial(print, "hi")}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        read_state_dict(path)


def test_missing_file_and_unknown_backbone(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_state_dict(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="Valid choices"):
        extract_backbone_state_dict({"a": torch.zeros(1)}, "resnet")


def test_cache_dir_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("SURGENET_SSL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert weights_mod.cache_dir() == tmp_path / ".cache" / "surgenet_ssl" / "weights"
    monkeypatch.setenv("SURGENET_SSL_CACHE", str(tmp_path / "elsewhere"))
    assert weights_mod.cache_dir() == tmp_path / "elsewhere" / "weights"  # one cache root for demo data and weights


def test_file_url(published_files):
    url = published_files["pvt_v2_b2"].resolve().as_uri()
    assert url.startswith("file://")
    assert load_backbone_weights(fresh("pvt_v2_b2"), url, "pvt_v2_b2").loaded == 332


def test_https_download_is_cached_and_sha256_checked(monkeypatch, published_files, isolated_weight_cache):
    src = published_files["pvt_v2_b2"]
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    calls = []

    def fake_fetch(url, dest, hash_prefix=None):  # the real helper, reading the local file instead of the URL
        calls.append(url)
        torch.hub.download_url_to_file(src.resolve().as_uri(), str(dest), hash_prefix=hash_prefix, progress=False)

    monkeypatch.setattr(weights_mod, "_fetch", fake_fetch)
    url = "https://example.org/models/resolve/main/SurgeNet_PVTv2_checkpoint_epoch0050_teacher.pth?download=true"
    for _ in range(2):
        assert load_backbone_weights(fresh("pvt_v2_b2"), url, "pvt_v2_b2", sha256=digest).loaded == 332
    assert len(calls) == 1  # second time from the cache
    cached = list(isolated_weight_cache.rglob("*.pth"))
    assert [p.name for p in cached] == ["SurgeNet_PVTv2_checkpoint_epoch0050_teacher.pth"]

    bad_url = "https://example.org/other/teacher-deadbeef.pth"  # torch.hub convention: name-<sha256 prefix>.ext
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        read_state_dict(bad_url)
    assert not list(isolated_weight_cache.rglob("teacher-deadbeef.pth"))  # nothing cached
    good_url = f"https://example.org/other/teacher-{digest[:10]}.pth"
    assert set(read_state_dict(good_url)) == set(torch.load(src, weights_only=True))


def test_real_http_download_from_local_server(tmp_path, published_files):
    """The actual urllib path, against a bounded local server on 127.0.0.1 (no network)."""
    served = tmp_path / "served"
    served.mkdir()
    shutil.copyfile(published_files["caformer_s18"], served / "teacher.pth")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/teacher.pth"
        assert load_backbone_weights(fresh(), url, "caformer_s18").loaded == 152
        with pytest.raises(RuntimeError, match="Could not download"):
            read_state_dict(url.replace("teacher.pth", "missing.pth"))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_vit_small_timm_named_dino_checkpoint(tmp_path):
    torch.manual_seed(0)
    vit = build_backbone("vit_small").eval()
    path = tmp_path / "vit.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()}, "student": {}}, path)
    model = build_backbone("vit_small")
    report = load_backbone_weights(model, path, "vit_small")
    assert report.loaded == len(vit.state_dict())
    assert_same_weights(model, vit)


def test_standin_matches_published_tensor_counts(published_standin):
    assert len(published_standin("caformer_s18")) == 152
    assert sum(v.numel() for v in published_standin("caformer_s18").values()) == 23_237_888

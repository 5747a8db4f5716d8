"""Embedded demo dataset: generated once through the real prepare path, cached, safe under concurrent callers."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import time
from pathlib import Path

import numpy as np
from torchvision.transforms.functional import to_tensor

from surgenet_ssl.data.decode import decode_rgb_image
from surgenet_ssl.data.demo import DEMO_PROCEDURES, demo_is_complete, ensure_demo_dataset
from surgenet_ssl.data.loader import build_train_loader
from surgenet_ssl.data.shards import iter_shard


def test_demo_is_generated_once_and_streams(demo_cache: Path) -> None:
    t0 = time.time()
    demo = ensure_demo_dataset(demo_cache)
    assert demo == demo_cache / "demo" and demo_is_complete(demo)
    top = json.loads((demo / "manifest.json").read_text())
    assert top["frames"] == 180 and sorted(top["sources"]) == sorted(DEMO_PROCEDURES)
    for name in DEMO_PROCEDURES:
        m = json.loads((demo / name / "manifest.json").read_text())
        assert m["frames"] == 60 and m["settings"]["fps"] == 2.0 and m["complete"]
        assert len(list((demo / "videos" / name).glob("*.mp4"))) == 3
    assert sum(p.stat().st_size for p in demo.rglob("*") if p.is_file()) < 8e6  # a few MB
    assert time.time() - t0 < 60
    t1 = time.time()
    assert ensure_demo_dataset(demo_cache) == demo and time.time() - t1 < 1.0  # cached

    cfg = {"name": "demo", "generate": "demo", "root": str(demo_cache), "sources": None, "fraction": 1.0}
    loader = build_train_loader(
        cfg, "/unused", lambda im: [to_tensor(im.resize((32, 24)))], batch_size=12, num_workers=0
    )
    assert loader.dataset.sources == list(DEMO_PROCEDURES) and len(loader) == 180 // 12
    batch = next(iter(loader))
    assert batch["crops"][0].shape == (12, 3, 24, 32) and batch["source"].max() < 3


def test_demo_procedures_look_different(demo_cache: Path) -> None:
    demo = ensure_demo_dataset(demo_cache)
    means = {}
    for name in DEMO_PROCEDURES:
        m = json.loads((demo / name / "manifest.json").read_text())
        imgs = [
            np.asarray(decode_rgb_image(s["jpg"]), dtype=np.float32)
            for _, s in iter_shard(demo / name / m["shards"][0]["file"])
        ]
        assert imgs[0].shape == (240, 320, 3)
        means[name] = np.mean([im.reshape(-1, 3).mean(0) for im in imgs], axis=0)
    names = list(means)
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.abs(means[names[i]] - means[names[j]]).max() > 15  # mean colour differs per procedure


def test_concurrent_callers_share_one_build(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.map(ensure_demo_dataset, [str(tmp_path)] * 2)  # child processes import no torch
    assert results == [tmp_path / "demo"] * 2 and demo_is_complete(tmp_path / "demo")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo.lock", "demo"]  # no temp dirs left


def test_damaged_demo_is_rebuilt(tmp_path: Path, demo_cache: Path) -> None:
    shutil.copytree(ensure_demo_dataset(demo_cache), tmp_path / "demo")
    demo = tmp_path / "demo"
    assert ensure_demo_dataset(tmp_path) == demo and demo_is_complete(demo)
    shard = next((demo / "prostatectomy" / "shards").glob("*.tar"))
    shard.unlink()
    assert not demo_is_complete(demo)
    assert ensure_demo_dataset(tmp_path) == demo and demo_is_complete(demo) and shard.is_file()

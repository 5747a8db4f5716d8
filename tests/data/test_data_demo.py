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


def test_each_recording_segment_has_its_own_camera_look() -> None:
    """A video's four segments differ in colour balance far more than frames within a segment do (the nuisance the
    demo's k-NN baseline rests on), while the scene under the look is the same rendering."""
    from surgenet_ssl.data import demo as D

    name = "cholecystectomy"
    frames = D._render_video(name, D.DEMO_PROCEDURES[name], 0)
    per = len(frames) // D.LOOK_SEGMENTS
    # channel ratios (R/G, B/G) of the frame means: white balance, independent of the scene's brightness
    ratios = np.array([f.reshape(-1, 3).mean(0) for f in frames])
    ratios = ratios[:, [0, 2]] / ratios[:, [1]]
    segments = [ratios[k * per : (k + 1) * per] for k in range(D.LOOK_SEGMENTS)]
    within = max(float(np.ptp(seg, axis=0).max()) for seg in segments)
    between = [float(np.abs(a.mean(0) - b.mean(0)).max()) for a, b in zip(segments, segments[1:], strict=False)]
    assert min(between) > within, (between, within)

    # The same scene: with the looks switched off the frames are version 1's rendering, which differs only by them.
    plain = D.LOOK_SEGMENTS
    try:
        D.LOOK_SEGMENTS = 0
        unlooked = D._render_video(name, D.DEMO_PROCEDURES[name], 0)
    finally:
        D.LOOK_SEGMENTS = plain
    assert len(unlooked) == len(frames) and not np.array_equal(unlooked[0], frames[0])
    # a look is a per-pixel colour transform: the edges (instrument outlines) stay where they were
    edges = [np.abs(np.diff(f.astype(np.float32).mean(-1), axis=1)) > 40 for f in (unlooked[5], frames[5])]
    assert (edges[0] & edges[1]).sum() > 0.5 * edges[0].sum()


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


_ENCODE_ONE_VIDEO = """
import hashlib, sys, tempfile
from pathlib import Path
from surgenet_ssl.data import demo
name = list(demo.DEMO_PROCEDURES)[1]
frames = demo._render_video(name, demo.DEMO_PROCEDURES[name], 0)
for _ in range(3):
    path = Path(tempfile.mkdtemp()) / "clip.mp4"
    demo.write_demo_video(path, frames)
    print(hashlib.sha256(path.read_bytes()).hexdigest())
"""


def test_demo_video_bytes_do_not_depend_on_the_thread_environment() -> None:
    """The demo is the same data everywhere: each encode of the same frames, in one process or in processes with
    other thread settings, gives the same bytes (x264's mbtree rate control gave a different stream on repeated
    encodes, and the demo run's learning figures moved with it)."""
    import os
    import subprocess
    import sys

    digests = set()
    for threads in ("1", "2", None):
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        if threads:
            env["OMP_NUM_THREADS"] = threads
        out = subprocess.run(
            [sys.executable, "-c", _ENCODE_ONE_VIDEO], env=env, capture_output=True, text=True, check=True
        )
        digests.update(out.stdout.split())
    assert len(digests) == 1, digests

"""``evaluate`` scores the same backbone at random init too (baseline=random, the default) and prints both and the
gain before the last line ``knn_top1=<float>``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from evaluation.helpers import make_image_folder
from surgenet_ssl.backbones import build_backbone
from surgenet_ssl.config.dirs import CONFIG_DIR
from surgenet_ssl.evaluate import baseline_mode, evaluate

TINY = [
    "backbone=timm",
    "backbone.timm_name=test_resnet",
    "data.image_size=32",
    "data.num_workers=0",
    "data.batch_size=8",
    "tsne.max_points=50",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("baseline")
    make_image_folder(root / "train", 6)
    make_image_folder(root / "val", 3, seed=1)
    torch.manual_seed(5)  # "trained" weights: any weights other than the seed-0 random init
    torch.save(build_backbone("timm", timm_name="test_resnet").state_dict(), root / "weights.pth")
    return root


def _cfg(root: Path, out: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(
            "evaluate",
            overrides=[f"output={out}", f"data.train={root / 'train'}", f"data.val={root / 'val'}", *TINY, *overrides],
        )


def test_baseline_is_the_weights_null_run_and_gain_is_the_difference(folders, tmp_path):
    with_weights = evaluate(_cfg(folders, tmp_path / "a", f"weights={folders / 'weights.pth'}"))
    random_run = evaluate(_cfg(folders, tmp_path / "b", "weights=null"))
    base, gain = with_weights["baseline"], with_weights["gain"]
    # the baseline is exactly what `weights=null` (same seed) scores
    for key in ("knn_top1", "knn_top5", "linear_probe_accuracy"):
        assert base[key] == pytest.approx(random_run[key], abs=1e-9)
        assert gain[key] == pytest.approx(with_weights[key] - random_run[key], abs=1e-9)
    assert random_run["baseline"] is None and random_run["gain"] is None  # weights=null is the baseline itself
    stored = json.loads((tmp_path / "a" / "results.json").read_text())
    assert stored["baseline"]["knn_top1"] == pytest.approx(base["knn_top1"])
    off = evaluate(_cfg(folders, tmp_path / "c", f"weights={folders / 'weights.pth'}", "baseline=null"))
    assert off["baseline"] is None and off["knn_top1"] == pytest.approx(with_weights["knn_top1"])


def test_baseline_option_values(folders, tmp_path):
    assert baseline_mode(_cfg(folders, tmp_path, "weights=null")) == "random"  # the default
    assert baseline_mode(_cfg(folders, tmp_path, "weights=null", "baseline=none")) is None
    with pytest.raises(ValueError, match="baseline=random"):
        baseline_mode(_cfg(folders, tmp_path, "weights=null", "baseline=imagenet"))


def test_cli_prints_both_and_the_gain_before_the_last_line(folders, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "surgenet_ssl.evaluate",
            f"weights={folders / 'weights.pth'}",
            f"data.train={folders / 'train'}",
            f"data.val={folders / 'val'}",
            *TINY,
            f"output={tmp_path / 'out'}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    values = dict(line.split("=", 1) for line in lines if "=" in line and " " not in line.split("=", 1)[0])
    assert lines[-1].startswith("knn_top1=")
    assert float(values["knn_top1_gain"]) == pytest.approx(
        float(values["knn_top1"]) - float(values["random_init_knn_top1"]), abs=2e-4
    )
    summary = [line for line in lines if line.startswith("k-NN top-1:")]
    assert summary and "at random init ->" in summary[0] and lines.index(summary[0]) < len(lines) - 1

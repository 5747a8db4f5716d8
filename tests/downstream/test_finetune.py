"""Fine-tuning runs (in process, tiny timm models and images): results, seeds, variants, fractions, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import surgenet_ssl.config.resolvers  # noqa: F401 - registers the config resolvers
from downstream.helpers import fake_pretraining_run, save_timm_teacher
from surgenet_ssl.config.dirs import CONFIG_DIR
from surgenet_ssl.downstream.module import lr_factor
from surgenet_ssl.downstream.runner import (
    aggregate_runs,
    apply_demo_defaults,
    find_demo_teacher,
    resolve_variants,
    run_finetune,
)

TINY = [
    "backbone=timm",
    "backbone.timm_name=test_convnext",
    "logger=csv",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.precision=32-true",
    "trainer.enable_progress_bar=false",
    "data.num_workers=0",
    "data.image_size=[32,32]",
    "data.batch_size=4",
    "trainer.max_epochs=1",
]


def _cfg(output: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("finetune", overrides=[*TINY, f"output={output}", f"paths.output_dir={output}", *overrides])
    OmegaConf.set_struct(cfg, False)
    return cfg


def test_segmentation_two_variants_two_seeds_then_report(seg_data, tmp_path):
    weights = fake_pretraining_run(tmp_path / "sweep" / "0_dataset=cholec", "cholec", 1.0)["teacher_pth"]
    out = tmp_path / "out"
    cfg = _cfg(
        out,
        "task=segmentation",
        f"weights='{weights}'",
        "random_init_baseline=true",
        "seeds=[0,1]",
        f"data.train={seg_data / 'train'}",
        f"data.val={seg_data / 'val'}",
        "overlays=2",
        "trainer.check_val_every_n_epoch=1",
        "trainer.log_every_n_steps=1",
        "metrics.per_image_dice=true",
    )
    results = run_finetune(cfg, overrides=[])
    saved = json.loads((out / "results.json").read_text())
    assert saved["primary_metric"] == "mIoU" and saved["task"] == "segmentation" and saved["seeds"] == [0, 1]
    assert saved["metrics"]["convention"]["mIoU"] == "dataset-level"
    assert saved["metrics"]["convention"]["mDice_per_image"] == "per-image"
    assert "MONAI" in saved["metrics"]["definitions"]["per-image"]
    run0 = saved["variants"]["pretrained"]["runs"][0]["metrics"]
    assert 0 <= run0["mDice_per_image"] <= 1 and set(run0["dice_per_image"]) == {"background", "tissue", "tool"}
    assert list(saved["variants"]) == ["pretrained", "random_init"]
    pre = saved["variants"]["pretrained"]
    assert pre["weights"] == str(weights.resolve()) and len(pre["weights_sha256"]) == 64
    assert "Loaded" in pre["weights_loaded"] and saved["variants"]["random_init"]["weights"] is None
    assert len(pre["runs"]) == 2 and set(pre["mean"]["iou"]) == {"background", "tissue", "tool"}
    runs = [r["metrics"]["mIoU"] for r in pre["runs"]]
    assert pre["mean"]["mIoU"] == pytest.approx(sum(runs) / 2)
    assert pre["std"]["mIoU"] == pytest.approx(abs(runs[0] - runs[1]) / 2**0.5)  # sample std of two values
    assert saved["summary"]["pretrained"]["mIoU"]["n"] == 2
    assert saved["data"]["val"]["pixels_per_class"]["<ignored>"] == 0 and saved["data"]["train"]["videos"] == 3
    assert results["variants"]["pretrained"]["mean"]["mIoU"] == pre["mean"]["mIoU"]
    # logs per run, overlays for the first seed, nothing half-written left behind
    metrics_csv = (out / "runs" / "pretrained" / "seed1" / "csv" / "metrics.csv").read_text()
    assert "train/loss" in metrics_csv and "val/mIoU" in metrics_csv
    assert (out / "overlays" / "pretrained.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "overlays" / "random_init.png").is_file() and not (out / ".partial").exists()
    # the report finds the run and this result (matched by the teacher's sha256) and the random-init baseline
    from surgenet_ssl.reporting import make_report

    report = make_report([tmp_path / "sweep", out], tmp_path / "report")
    rows = {r["model"]: r for r in report["rows"]}
    # columns name the metric's convention after it (docs/metrics.md), e.g. "...:mIoU (dataset-level, ...)"
    column = next(
        c for c in rows["cholec_test_convnext"]["values"] if c.startswith(f"segmentation[{seg_data.name}]:mIoU")
    )
    assert rows["cholec_test_convnext"]["values"][column][0] == pytest.approx(pre["mean"]["mIoU"])
    assert rows["cholec_test_convnext"]["pretrain_frames"] == 250_655
    assert rows["random init (test_convnext)"]["values"][column][2] == 2


def test_cli_bad_input_is_one_clear_line(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "SURGENET_SSL_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "surgenet_ssl.finetune",
            "task=segmentation",
            "weights=null",
            f"data.train={tmp_path / 'nowhere'}",
            f"data.val={tmp_path / 'nowhere'}",
            "logger=csv",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: Segmentation data not found: {tmp_path / 'nowhere'}" in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists() and not (tmp_path / "run" / "runs").exists()


@pytest.mark.slow
def test_cli_demo_compares_the_demo_teacher_with_random_init(tmp_path):
    """``python -m surgenet_ssl.finetune task=segmentation`` with no data arguments, shortened."""
    import os
    import subprocess
    import sys

    fake_pretraining_run(tmp_path / "outputs" / "demo_timm" / "2026-11-25_10-00-00", "demo", 1.0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SURGENET_SSL_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "surgenet_ssl.finetune",
            "task=segmentation",
            "backbone=timm",
            "backbone.timm_name=test_convnext",
            "logger=csv",
            "data.train_fraction=0.3",
            "data.image_size=[64,64]",
            "trainer.max_epochs=1",
            "overlays=1",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("mIoU=") and any(line.startswith("random_init") for line in lines)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["demo"] is True and list(results["variants"]) == ["pretrained", "random_init"]
    assert "demo_timm" in results["variants"]["pretrained"]["weights"]
    assert results["data"]["train_samples_used"] == 48 and results["data"]["train"]["videos"] == 3
    assert results["class_names"] == ["background", "tissue", "grasper", "robotic_instrument", "stapler"]
    assert (tmp_path / "run" / "overlays" / "pretrained.png").is_file()


def test_multilabel_csv_linear_probe_with_fraction(tmp_path):
    from PIL import Image

    rows = ["path,c1,c2,video"]
    for i in range(12):
        Image.new("RGB", (24, 24), (200 if i % 2 else 20, 100, 60 if i % 3 else 220)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{i % 2},{int(i % 3 == 0)},v{i // 3}")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "val.csv").write_text("\n".join(rows[:1] + rows[1:7]) + "\n")
    out = tmp_path / "out"
    cfg = _cfg(
        out,
        "task=classification",
        "task.mode=linear",
        "weights=null",
        "seeds=[3]",
        f"data.train={tmp_path / 'train.csv'}",
        f"data.val={tmp_path / 'val.csv'}",
        "data.train_fraction=0.5",
        "trainer.check_val_every_n_epoch=0",
        "trainer.log_every_n_steps=1",
    )
    results = run_finetune(cfg, overrides=[])
    assert results["task"] == "multilabel_classification" and results["primary_metric"] == "mAP"
    assert list(results["variants"]) == ["random_init"] and results["class_names"] == ["c1", "c2"]
    assert results["data"]["fraction_by"] == "group" and len(results["data"]["train_videos_used"]) == 2
    assert results["data"]["train_samples_used"] == 6
    metrics = results["variants"]["random_init"]["runs"][0]["metrics"]
    assert set(metrics["ap"]) == {"c1", "c2"} and 0 <= metrics["mAP"] <= 1
    assert set(metrics["balanced_accuracy_per_label"]) == {"c1", "c2"} and 0 <= metrics["balanced_accuracy"] <= 1
    assert results["metrics"]["convention"]["mAP"] == "absent=0"
    assert results["variants"]["random_init"]["mean"]["balanced_accuracy"] == metrics["balanced_accuracy"]
    assert (out / "results.json").is_file()


def test_phases_with_videos_get_pooled_and_per_video_metrics_named(tmp_path):
    from PIL import Image

    rows = ["path,label,video"]
    for v in range(3):
        for n in range(6):
            phase = "a" if n < 3 else "b"
            Image.new("RGB", (24, 24), (40 + 150 * (phase == "b"), 90, 60 + 20 * v)).save(tmp_path / f"v{v}_{n}.png")
            rows.append(f"v{v}_{n}.png,{phase},v{v}")
    (tmp_path / "train.csv").write_text("\n".join(rows[:13]) + "\n")
    # validation: video v2, its rows in reverse order (per-video metrics sort them by frame number)
    (tmp_path / "val.csv").write_text("\n".join(rows[:1] + rows[18:12:-1]) + "\n")
    out = tmp_path / "out"
    cfg = _cfg(
        out,
        "task=classification",
        "task.mode=linear",
        "weights=null",
        "seeds=[0]",
        f"data.train={tmp_path / 'train.csv'}",
        f"data.val={tmp_path / 'val.csv'}",
        "trainer.check_val_every_n_epoch=0",
        "trainer.log_every_n_steps=1",
    )
    results = run_finetune(cfg, overrides=[])
    convention = results["metrics"]["convention"]
    assert convention["accuracy"] == "pooled" and convention["per_video.relaxed"] == "per-video relaxed"
    metrics = results["variants"]["random_init"]["runs"][0]["metrics"]
    video = metrics["per_video"]
    assert video["videos"] == 1 and video["boundary_frames"] == 10 and not video["cholec80_rules"]
    # one validation video: its accuracy is the pooled accuracy
    assert video["strict"]["accuracy"] == pytest.approx(metrics["accuracy"])
    assert video["strict"]["per_video_accuracy"] == {"v2": pytest.approx(metrics["accuracy"])}
    assert set(video["relaxed"]["per_phase"]["jaccard"]) == {"a", "b"}
    mean = results["variants"]["random_init"]["mean"]
    assert mean["per_video"]["strict"]["jaccard"] == pytest.approx(video["strict"]["jaccard"])
    cfg.metrics.absent_labels = "nan"
    with pytest.raises(ValueError, match="metrics.absent_labels=nan"):
        run_finetune(cfg, overrides=[])


def test_bad_input_fails_before_anything_is_written(seg_data, tmp_path):
    import numpy as np
    from PIL import Image

    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(seg_data / "val", bad)
    mask = sorted((bad / "masks").rglob("*.png"))[0]
    Image.fromarray(np.full((64, 64), 9, np.uint8), mode="L").save(mask)
    out = tmp_path / "out"
    cfg = _cfg(out, "task=segmentation", "weights=null", f"data.train={seg_data / 'train'}", f"data.val={bad}")
    with pytest.raises(ValueError, match=rf"{mask.name} has class id\(s\) \[9\] out of range"):
        run_finetune(cfg, overrides=[])
    assert not out.exists()
    # weights of another architecture: refused before training, naming the backbone
    other = save_timm_teacher(tmp_path / "resnet.pth", timm_name="test_resnet")
    cfg = _cfg(
        out, "task=segmentation", f"weights={other}", f"data.train={seg_data / 'train'}", f"data.val={seg_data / 'val'}"
    )
    with pytest.raises(ValueError, match="cannot be loaded into backbone=test_convnext"):
        run_finetune(cfg, overrides=[])
    assert not (out / "results.json").exists()
    # an unknown validation label names the CSV and the image
    (tmp_path / "t.csv").write_text("path,label\na.png,x\nb.png,y\n")
    (tmp_path / "v.csv").write_text("path,label\nc.png,z\n")
    cfg = _cfg(
        out,
        "task=classification",
        "weights=null",
        f"data.train={tmp_path / 't.csv'}",
        f"data.val={tmp_path / 'v.csv'}",
        "data.validate=false",
    )
    with pytest.raises(ValueError, match=r"v\.csv: label 'z' of .*c\.png is not a known class"):
        run_finetune(cfg, overrides=[])
    cfg = _cfg(out, "task=segmentation", f"weights={other}", f"data.train={seg_data / 'train'}")
    with pytest.raises(ValueError, match="missing data.val"):
        run_finetune(cfg, overrides=[])


def test_weights_auto_finds_the_demo_teacher_and_demo_defaults_yield_to_the_command_line(tmp_path):
    cfg = _cfg(tmp_path / "o", "task=segmentation", f"demo_runs_dir={tmp_path / 'outputs'}")
    with pytest.raises(
        FileNotFoundError, match=r"No demo teacher found for backbone=timm.*python -m surgenet_ssl.train"
    ):
        resolve_variants(cfg, demo=True)
    with pytest.raises(ValueError, match="weights=auto only finds the demo teacher"):
        resolve_variants(cfg, demo=False)
    run = tmp_path / "outputs" / "demo_timm" / "2026-01-01_00-00-00"
    paths = fake_pretraining_run(run, dataset="demo", fraction=1.0)
    assert find_demo_teacher(cfg) == paths["teacher_pth"]
    assert resolve_variants(cfg, demo=True) == [("pretrained", str(paths["teacher_pth"])), ("random_init", None)]
    other = _cfg(
        tmp_path / "o", "task=segmentation", "backbone.timm_name=test_resnet", f"demo_runs_dir={tmp_path / 'outputs'}"
    )
    assert find_demo_teacher(other) is None  # a teacher of another timm model is not taken
    applied = apply_demo_defaults(cfg, {"trainer.max_epochs", "data.augment"})
    assert cfg.data.image_size == [96, 128] and cfg.trainer.max_epochs == 1 and cfg.data.augment.scale == [0.5, 2.0]
    assert "data.image_size=[96, 128]" in applied and not any(a.startswith("trainer.max_epochs") for a in applied)


def test_lr_schedule_and_aggregation_by_hand():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1) and lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "poly", power=1.0) == pytest.approx(0.5)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    runs = [
        {"metrics": {"mIoU": 0.5, "iou": {"a": 0.4, "b": float("nan")}}},
        {"metrics": {"mIoU": 0.7, "iou": {"a": 0.6, "b": 0.2}}},
    ]
    mean, std = aggregate_runs(runs)
    assert mean["mIoU"] == pytest.approx(0.6) and std["mIoU"] == pytest.approx(0.2 / 2**0.5)
    assert mean["iou"]["b"] == pytest.approx(0.2) and std["iou"]["b"] is None  # one defined value: no spread
    assert aggregate_runs(runs[:1])[1]["mIoU"] is None
    torch.manual_seed(0)


def test_fpn_takes_the_stride_4_to_32_stages_of_models_with_a_stride_2_stem():
    from surgenet_ssl.models import BackboneFPN

    model = BackboneFPN("timm", 3, timm_name="test_resnet")  # ResNet: act1 (2), layer1..4 (4..32)
    assert model.encoder.feature_info.reduction() == [4, 8, 16, 32]
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)

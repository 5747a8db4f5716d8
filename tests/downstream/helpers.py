"""Tiny labelled datasets and pretraining-run stand-ins for the downstream and report tests (real files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLASSES = ("background", "tissue", "tool")


def make_seg_folder(
    split: Path, cases=("case1", "case2"), per_case: int = 3, size=(64, 64), seed: int = 0, classes_file: bool = True
) -> Path:
    """``split/images/<case>/<n>.png`` + ``split/masks/<case>/<n>.png`` (+ classes.txt): a dark border (0), tissue (1)
    and a bright bar (2) at a varying place; the image is a noisy function of the mask."""
    rng = np.random.default_rng(seed)
    h, w = size
    for case in cases:
        (split / "images" / case).mkdir(parents=True, exist_ok=True)
        (split / "masks" / case).mkdir(parents=True, exist_ok=True)
        for n in range(per_case):
            mask = np.ones((h, w), np.uint8)
            mask[: h // 8], mask[-h // 8 :] = 0, 0
            x0 = int(rng.integers(0, w - w // 4))
            mask[h // 4 : 3 * h // 4, x0 : x0 + w // 6] = 2
            colours = np.array([[10, 10, 10], [170, 60, 60], [220, 220, 230]], np.float32)
            image = (colours[mask] + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(image).save(split / "images" / case / f"{case}_{n:03d}.png")
            Image.fromarray(mask, mode="L").save(split / "masks" / case / f"{case}_{n:03d}.png")
    if classes_file:
        (split / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return split


def save_timm_teacher(path: Path, timm_name: str = "test_convnext", seed: int = 0) -> Path:
    """A flat timm-named backbone state dict, as our export writes for timm backbones."""
    from surgenet_ssl.backbones import build_backbone

    torch.manual_seed(seed)
    torch.save(build_backbone("timm", timm_name=timm_name).state_dict(), path)
    return path


def fake_pretraining_run(
    run_dir: Path,
    dataset: str = "small",
    fraction: float = 0.1,
    timm_name: str = "test_convnext",
    epochs: int = 2,
    seed: int = 0,
    knn: float = 0.5,
) -> dict:
    """A run dir as ``python -m surgenet_ssl.train`` leaves it: config.yaml, checkpoints/, embeddings/ and a real
    export (teacher .pth/.safetensors, DINO checkpoint, model card) written by ``export_checkpoint``."""
    from omegaconf import OmegaConf

    from surgenet_ssl.backbones import build_backbone
    from surgenet_ssl.training.teacher_export import export_checkpoint

    torch.manual_seed(seed)
    backbone = build_backbone("timm", timm_name=timm_name).state_dict()
    state = {f"{branch}.backbone.{k}": v.clone() for branch in ("teacher", "student") for k, v in backbone.items()}
    state["dino_loss.center"] = torch.zeros(1, 8)
    run_config = {
        "backbone": {"name": "timm", "timm_name": timm_name},
        "dataset": {"name": dataset, "fraction": fraction, "sources": None},
        "trainer": {"max_epochs": epochs},
        "data": {"batch_size": 4},
    }
    checkpoint = {
        "state_dict": state,
        "epoch": epochs,
        "global_step": 10 * epochs,
        "hyper_parameters": {"backbone": {"name": "timm", "timm_name": timm_name}, "dino": {}},
        "callbacks": {"KNNMonitor": {"last_result": {"knn/top1": knn, "knn/top5": 1.0}, "last_epoch": epochs}},
        "run_provenance": {
            "command": f"python -m surgenet_ssl.train dataset={dataset}",
            "overrides": [],
            "git_commit": "unknown",
            "version": "0.1.0",
        },
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(run_config)))
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / "embeddings").mkdir(exist_ok=True)
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(run_dir / "embeddings" / f"epoch{epochs:04d}.png")
    return export_checkpoint(checkpoint, run_dir / "export", dataset, run_config)

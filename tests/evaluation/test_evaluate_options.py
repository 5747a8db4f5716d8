"""``evaluate`` builds the backbone with the same ``backbone.*`` options as training, and refuses an unwritable
output directory before extracting features."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from evaluation.helpers import make_image_folder
from support.tiny_training import tiny_dino
from surgenet_ssl import evaluate as evaluate_mod
from surgenet_ssl.backbones.options import backbone_options
from surgenet_ssl.config.dirs import CONFIG_DIR
from surgenet_ssl.training.module import DINOModule

# A ViT with register tokens and a dynamic image size: options that change the weights / what the model accepts.
VIT_OPTIONS = {
    "name": "timm",
    "timm_name": "test_vit",
    "drop_path_rate": 0.1,
    "reg_tokens": 2,
    "dynamic_img_size": True,
}


def _cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("evaluate", overrides=[f"output={tmp_path / 'out'}", *overrides])


@pytest.fixture(scope="module")
def trained_vit(tmp_path_factory) -> tuple[Path, DINOModule]:
    """A DINOModule built as `train` builds it from backbone.* options, saved like a Lightning checkpoint."""
    torch.manual_seed(0)
    module = DINOModule(VIT_OPTIONS, tiny_dino(), batch_size=2)
    path = tmp_path_factory.mktemp("vit") / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "global_step": 0}, path)
    return path, module


def test_backbone_options_are_those_training_passes():
    assert backbone_options(VIT_OPTIONS) == {
        "timm_name": "test_vit",
        "reg_tokens": 2,
        "dynamic_img_size": True,
    }
    assert backbone_options({"name": "caformer_s18", "timm_name": None, "drop_path_rate": 0.1}) == {}


def test_model_trained_with_extra_backbone_options_is_scored(trained_vit, tmp_path):
    weights, module = trained_vit
    make_image_folder(tmp_path / "train", 4)
    make_image_folder(tmp_path / "val", 2, seed=1)
    overrides = [
        f"weights={weights}",
        "backbone=timm",
        "backbone.timm_name=test_vit",
        "+backbone.reg_tokens=2",
        "+backbone.dynamic_img_size=true",
        f"data.train={tmp_path / 'train'}",
        f"data.val={tmp_path / 'val'}",
        "data.image_size=32",
        "data.num_workers=0",
        "tsne.perplexity=2",
    ]
    model, summary = evaluate_mod.build_model(_cfg(tmp_path, *overrides))
    assert "Loaded" in summary and "0 missing, 0 unexpected" in summary
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), module.teacher.backbone.eval()(x), atol=1e-5)
    results = evaluate_mod.evaluate(_cfg(tmp_path, *overrides))
    assert 0.0 <= results["knn_top1"] <= 1.0 and results["feature_dim"] == 64


def test_unwritable_output_fails_before_feature_extraction(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "train", 2)
    make_image_folder(tmp_path / "val", 1)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")

    def must_not_run(*args, **kwargs):
        raise AssertionError("features extracted (or model built) before the output dir was checked")

    # (evaluate imports extract_features from the evaluation package when it runs: patch it there)
    monkeypatch.setattr("surgenet_ssl.evaluation.extract_features", must_not_run)
    monkeypatch.setattr(evaluate_mod, "build_model", must_not_run)
    cfg = _cfg(
        tmp_path,
        "weights=null",
        "backbone=timm",
        "backbone.timm_name=test_resnet",
        f"data.train={tmp_path / 'train'}",
        f"data.val={tmp_path / 'val'}",
        f"output={blocker / 'results'}",
    )
    with pytest.raises(ValueError, match=r"output=.*a_file/results is not a writable directory"):
        evaluate_mod.evaluate(cfg)

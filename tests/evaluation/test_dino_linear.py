"""DINO's linear evaluation protocol (eval_linear.py) on a tiny ViT: its input features, its optimiser and
schedule, best-validation accuracy, and ``evaluate protocol=both`` naming each number's convention."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from evaluation.helpers import make_image_folder
from surgenet_ssl.backbones import build_backbone
from surgenet_ssl.config.dirs import CONFIG_DIR
from surgenet_ssl.evaluate import evaluate
from surgenet_ssl.evaluation import ImageFolderDataset, dino_linear_eval, linear_input


def _vit():
    torch.manual_seed(0)
    return build_backbone("timm", timm_name="test_vit").eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dino_linear")
    make_image_folder(root / "train", 6)
    make_image_folder(root / "val", 3, seed=1)
    return root


@torch.no_grad()
def test_vit_input_is_the_normed_cls_tokens_of_the_last_blocks():
    model = _vit()
    x = torch.randn(2, 3, 32, 32)
    # by hand: DINO's get_intermediate_layers(x, n) = the final norm of each of the last n blocks' outputs
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    outputs = []
    for block in model.blocks:
        tokens = block(tokens)
        outputs.append(model.norm(tokens))
    expected = torch.cat([o[:, 0] for o in outputs[-4:]], dim=-1)
    assert torch.allclose(linear_input(model, x, n_last_blocks=4), expected, atol=1e-5)
    with_pool = linear_input(model, x, n_last_blocks=1, avgpool=True)
    assert torch.allclose(with_pool, torch.cat([outputs[-1][:, 0], outputs[-1][:, 1:].mean(1)], dim=-1), atol=1e-5)
    assert with_pool.shape == (2, 2 * model.embed_dim)
    # not a ViT: the pooled features
    resnet = build_backbone("timm", timm_name="test_resnet").eval()
    assert torch.equal(linear_input(resnet, x, n_last_blocks=4), resnet(x))


def test_protocol_sgd_momentum_scaled_lr_cosine_and_best_validation_accuracy(folders, monkeypatch):
    train = ImageFolderDataset(folders / "train", image_size=32)
    val = ImageFolderDataset(folders / "val", image_size=32, classes=train.classes)
    seen: dict = {"lrs": []}

    class Spy(torch.optim.SGD):
        def __init__(self, params, **kwargs):
            seen.update(kwargs)
            super().__init__(params, **kwargs)

        def step(self, closure=None):  # type: ignore[override]
            seen["lrs"].append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "SGD", Spy)
    result = dino_linear_eval(
        _vit(), train, val, num_classes=3, epochs=3, batch_size=8, lr=32.0, n_last_blocks=4, device="cpu"
    )
    # lr 32 at batch 256 -> 1.0 at batch 8; momentum 0.9, no weight decay; cosine per epoch over 3 epochs
    assert seen["momentum"] == 0.9 and seen["weight_decay"] == 0.0 and result.lr == pytest.approx(1.0)
    per_epoch = sorted(set(seen["lrs"]), reverse=True)
    assert per_epoch == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 3)), 0.5 * (1 + math.cos(2 * math.pi / 3))])
    assert len(seen["lrs"]) == 3 * 3  # 18 images / batch 8 -> 3 steps per epoch (the last batch kept)
    assert result.feature_dim == 4 * 64 and "last 4 block(s)" in result.features
    assert set(result.accuracies) == {1, 2, 3} and result.last_accuracy == result.accuracies[3]
    assert result.best_accuracy == max(result.accuracies.values()) == result.accuracies[result.best_epoch]
    assert result.best_accuracy >= 2 / 3  # colour classes: a linear layer on random ViT features separates them


def test_evaluate_protocol_both_reports_each_with_its_convention(folders, tmp_path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "evaluate",
            overrides=[
                "weights=null",
                "backbone=timm",
                "backbone.timm_name=test_vit",
                f"data.train={folders / 'train'}",
                f"data.val={folders / 'val'}",
                "data.image_size=32",
                "data.num_workers=0",
                "tsne.max_points=30",
                "protocol=both",
                "dino_linear.epochs=2",
                "dino_linear.batch_size=8",
                f"output={tmp_path}",
            ],
        )
    results = evaluate(cfg)
    assert 0 <= results["linear_probe_accuracy"] <= 1 and 0 <= results["dino_linear_accuracy"] <= 1
    assert results["dino_linear"]["best_accuracy"] == results["dino_linear_accuracy"]
    assert results["dino_linear"]["epochs"] == 2 and results["dino_linear"]["lr"] == pytest.approx(0.001 * 8 / 256)
    convention = results["metrics"]["convention"]
    assert convention == {
        "knn_top1": "DINO k-NN",
        "knn_top5": "DINO k-NN",
        "linear_probe_accuracy": "logistic",
        "dino_linear_accuracy": "DINO linear",
    }
    assert "L-BFGS" in results["metrics"]["definitions"]["logistic"]
    cfg.protocol = "sgd"
    with pytest.raises(ValueError, match="protocol=sgd"):
        evaluate(cfg)

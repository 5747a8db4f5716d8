"""BatchNorm statistics of an untrained network are estimated on the evaluation images before it is scored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from surgenet_ssl.backbones import build_backbone
from surgenet_ssl.evaluation import calibrate_batch_norm, uncalibrated_batch_norms


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3),
        nn.BatchNorm2d(5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def test_estimated_statistics_are_the_mean_and_variance_of_each_layers_inputs():
    net = _net().eval()
    images = torch.randn(12, 3, 9, 9) * 3 + 1
    assert uncalibrated_batch_norms(net) == ["1", "4"]

    calibrated, n = calibrate_batch_norm(net, [images[:6], images[6:]])
    assert n == 2 and calibrated is not net and not calibrated.training
    # inputs of the first BatchNorm: the first convolution's output (the weights are the same in the copy)
    with torch.no_grad():
        first = net[0](images)
    per_batch = [first[:6], first[6:]]
    mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in per_batch]).mean(0)  # cumulative average of 2 equal batches
    var = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in per_batch]).mean(0)
    torch.testing.assert_close(calibrated[1].running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(calibrated[1].running_var, var, rtol=1e-5, atol=1e-5)
    assert int(calibrated[1].num_batches_tracked) == 2 and calibrated[1].momentum == 0.1  # momentum restored
    # the eval-mode first layer now standardises its inputs
    with torch.no_grad():
        normalised = calibrated[1](first)
    assert normalised.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (normalised.var(dim=(0, 2, 3)) - 1).abs().max() < 0.1
    # the original is untouched: still the fresh 0 / 1 statistics
    assert int(net[1].num_batches_tracked) == 0 and net[1].running_mean.abs().sum() == 0
    assert torch.equal(net[1].running_var, torch.ones(4))


def test_networks_without_fresh_batch_norm_are_returned_as_they_are():
    layer_norm = build_backbone("timm", timm_name="test_convnext2")  # LayerNorm: nothing to estimate
    assert calibrate_batch_norm(layer_norm, [torch.randn(2, 3, 32, 32)]) == (layer_norm, 0)
    used = _net().train()
    used(torch.randn(4, 3, 9, 9))  # statistics updated once (a trained or loaded network)
    assert uncalibrated_batch_norms(used) == []
    assert calibrate_batch_norm(used, [torch.randn(4, 3, 9, 9)]) == (used, 0)


def test_no_batch_of_two_images_is_a_clear_error():
    with pytest.raises(ValueError, match="no batch of at least 2 images"):
        calibrate_batch_norm(_net(), [torch.randn(1, 3, 9, 9)])


def test_random_init_batch_norm_baseline_in_evaluate_uses_estimated_statistics(tmp_path, caplog):
    import logging

    from evaluation.helpers import make_image_folder
    from evaluation.test_evaluate_baseline import _cfg
    from surgenet_ssl.evaluate import evaluate

    make_image_folder(tmp_path / "train", 6)
    make_image_folder(tmp_path / "val", 3, seed=1)
    with caplog.at_level(logging.INFO, logger="surgenet_ssl"):
        evaluate(_cfg(tmp_path, tmp_path / "out", "weights=null"))
    assert "BatchNorm layer(s) never saw data; their statistics were estimated on the 18 train images" in caplog.text

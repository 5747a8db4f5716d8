"""Linear probe on tiny sets and the t-SNE embedding map PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surgenet_ssl.evaluation import clamp_perplexity, linear_probe_accuracy, save_embedding_map, tsne_embedding


def _blobs(per_class: int, classes: int, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 5
    labels = torch.arange(classes).repeat_interleave(per_class)
    return centers[labels] + torch.randn(len(labels), dim, generator=g), labels


@pytest.mark.parametrize("classes", [2, 7])
def test_probe_separates_blobs_from_two_samples_per_class(classes):
    x_train, y_train = _blobs(2, classes, seed=0)
    x_test, y_test = _blobs(5, classes, seed=0)  # same centers, new noise
    x_test = x_test + 0.1 * torch.randn_like(x_test)
    assert linear_probe_accuracy(x_train, y_train, x_test, y_test) == 1.0


def test_probe_is_linear_xor_is_not_separable():
    x = np.array([[0, 0], [1, 1], [0, 1], [1, 0]], dtype=float)
    y = np.array([0, 0, 1, 1])
    assert linear_probe_accuracy(x, y, x, y) <= 0.75


def test_probe_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        linear_probe_accuracy(torch.randn(4, 3), torch.zeros(4), torch.randn(2, 3), torch.zeros(2))


def test_perplexity_is_clamped_for_small_sets():
    assert clamp_perplexity(30, 1000) == 30
    assert clamp_perplexity(30, 31) == 10
    assert clamp_perplexity(30, 2) == 1
    coords = tsne_embedding(torch.randn(5, 8))
    assert coords.shape == (5, 2) and np.isfinite(coords).all()


def test_embedding_map_png(tmp_path):
    x, y = _blobs(4, 3)
    path = save_embedding_map(
        x, y, tmp_path / "maps" / "tsne.png", label_names=["cholec80", "heichole", "lapgyn4"], max_points=10
    )
    data = path.read_bytes()
    assert path == tmp_path / "maps" / "tsne.png" and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="N labels"):
        save_embedding_map(x, y[:-1], tmp_path / "bad.png")

"""DINO weighted k-NN against hand-computed votes."""

from __future__ import annotations

import math

import pytest
import torch

from surgenet_ssl.evaluation import knn_accuracy, knn_classify

DEG40 = math.radians(40)


def _three_points():
    # a on the x-axis (class 0); b and c at +-40 degrees (class 1); b is given a non-unit norm on purpose
    train = torch.tensor([[1.0, 0.0], [3 * math.cos(DEG40), 3 * math.sin(DEG40)], [math.cos(DEG40), -math.sin(DEG40)]])
    labels = torch.tensor([0, 1, 1])
    return train, labels


def test_weighted_vote_matches_hand_computation():
    train, labels = _three_points()
    query = torch.tensor([[2.0, 0.0]])  # cosine 1 to a, cos(40 deg) = 0.7660 to b and c
    pred, scores = knn_classify(train, labels, query, num_classes=2, k=3, temperature=0.07)
    w_a = math.exp(1.0 / 0.07)  # 1.598e6
    w_bc = math.exp(math.cos(DEG40) / 0.07)  # 5.648e4 each
    expected0 = w_a / (w_a + 2 * w_bc)  # 0.93394
    assert scores[0, 0].item() == pytest.approx(expected0, rel=1e-5)
    assert scores[0, 1].item() == pytest.approx(1 - expected0, rel=1e-4)
    assert expected0 == pytest.approx(0.93394, abs=1e-4)
    # the single very similar neighbour beats the majority at T = 0.07 ...
    assert pred[0].tolist() == [0, 1]
    # ... but not at T = 1: e^1 = 2.718 < 2 e^0.766 = 4.303
    pred_t1, scores_t1 = knn_classify(train, labels, query, num_classes=2, k=3, temperature=1.0)
    assert pred_t1[0, 0].item() == 1
    assert scores_t1[0, 1].item() == pytest.approx(
        2 * math.exp(math.cos(DEG40)) / (math.e + 2 * math.exp(math.cos(DEG40))), rel=1e-5
    )


def test_k_limits_the_neighbours_and_is_clamped_to_the_train_set():
    train, labels = _three_points()
    query = torch.tensor([[math.cos(DEG40 / 2), math.sin(DEG40 / 2)]])  # halfway between a and b; c far
    _, scores_k1 = knn_classify(train, labels, query, num_classes=2, k=1)
    # nearest is a or b (tied at cos 20 deg); k=2 takes both: shares 1/2 each, c excluded
    _, scores_k2 = knn_classify(train, labels, query, num_classes=2, k=2)
    assert scores_k1.sum().item() == pytest.approx(1.0)
    assert scores_k2[0].tolist() == pytest.approx([0.5, 0.5], abs=1e-5)
    _, scores_k3 = knn_classify(train, labels, query, num_classes=2, k=3)
    _, scores_k20 = knn_classify(train, labels, query, num_classes=2, k=20)  # clamped to 3
    assert torch.allclose(scores_k3, scores_k20)
    assert scores_k3[0, 1].item() > 0.5  # c adds (a little) weight to class 1


def test_chunking_gives_the_same_result_and_classes_without_train_samples_score_zero():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(50, 8, generator=g)
    labels = torch.randint(0, 4, (50,), generator=g)  # classes 0-3 of 6
    test = torch.randn(37, 8, generator=g)
    p1, s1 = knn_classify(train, labels, test, num_classes=6, k=5, chunk_size=1000)
    p2, s2 = knn_classify(train, labels, test, num_classes=6, k=5, chunk_size=4)
    assert torch.equal(p1, p2) and torch.allclose(s1, s2)
    assert s1.shape == (37, 6) and torch.all(s1[:, 4:] == 0)
    assert torch.allclose(s1.sum(1), torch.ones(37))


def test_accuracy_top1_top5_by_hand():
    # 6 training points, one per class, ever less similar to the query direction (1, 0)
    angles = torch.tensor([0.0, 10.0, 20.0, 30.0, 40.0, 50.0]).deg2rad()
    train = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.arange(6)
    query = torch.tensor([[1.0, 0.0]]).repeat(3, 1)
    # true labels: 0 (rank 1), 4 (rank 5), 5 (rank 6)
    top1, top5 = knn_accuracy(train, labels, query, torch.tensor([0, 4, 5]), num_classes=6, k=6)
    assert top1 == pytest.approx(1 / 3)
    assert top5 == pytest.approx(2 / 3)


def test_top5_with_fewer_than_five_classes():
    train, labels = _three_points()
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    top1, top5 = knn_accuracy(train, labels, query, torch.tensor([1, 1]), num_classes=2, k=3)
    assert top1 == pytest.approx(0.5)
    assert top5 == 1.0


def test_top5_never_credits_a_class_without_a_vote():
    # 6 classes, k=2: the two neighbours vote for classes 4 and 5 only. Classes 0-2 would fill places 3-5 of the
    # ranking by index order; a query of class 0 is therefore a miss, not a top-5 hit.
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0], [0.0, -1.0], [0.0, 1.0], [-0.5, -0.5]])
    labels = torch.tensor([4, 5, 0, 1, 2, 3])
    query = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    top1, top5 = knn_accuracy(train, labels, query, torch.tensor([4, 0]), num_classes=6, k=2)
    assert top1 == pytest.approx(0.5) and top5 == pytest.approx(0.5)
    top1, top5 = knn_accuracy(train, labels, query, torch.tensor([5, 5]), num_classes=6, k=2)
    assert top1 == 0.0 and top5 == 1.0


def test_bad_inputs_are_explained():
    train, labels = _three_points()
    with pytest.raises(ValueError, match="different widths"):
        knn_classify(train, labels, torch.ones(1, 3), num_classes=2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 0\]"):
        knn_classify(train, labels, torch.ones(1, 2), num_classes=1)
    with pytest.raises(ValueError, match="empty"):
        knn_classify(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), torch.ones(1, 2), num_classes=2)

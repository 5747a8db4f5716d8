"""DINO's weighted k-NN classifier on frozen features (the standard SSL monitor, SURGENET.md section 6).

Why this exact rule: it is what the DINO paper and SurgeNet report, so numbers are comparable. Features are
L2-normalised, similarity is cosine, the k most similar training samples vote for their label with weight
exp(similarity / T). The votes of a test row are returned normalised to sum to 1 (a softmax over the k
similarities / T); that rescales DINO's raw sums by a per-row constant, so the ranking (and accuracy) is
identical, but never overflows for small T.

Test rows are processed in chunks, so memory is O(chunk_size x n_train) whatever the size of the test set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["knn_classify", "knn_accuracy"]


def _check_inputs(train_features: Tensor, train_labels: Tensor, test_features: Tensor, num_classes: int) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(
            f"k-NN needs 2-D feature matrices (samples x dims); got train {tuple(train_features.shape)}, "
            f"test {tuple(test_features.shape)}."
        )
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"Train and test features have different widths ({train_features.shape[1]} vs "
            f"{test_features.shape[1]}): were they extracted with the same backbone?"
        )
    if train_features.shape[0] == 0:
        raise ValueError("k-NN needs at least one training sample; the training set is empty.")
    if train_labels.ndim != 1 or train_labels.shape[0] != train_features.shape[0]:
        raise ValueError(
            f"train_labels must be 1-D with one label per training row; got shape {tuple(train_labels.shape)} "
            f"for {train_features.shape[0]} rows."
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    if train_labels.numel() and (int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes):
        raise ValueError(
            f"train_labels must lie in [0, {num_classes - 1}] (num_classes={num_classes}); found "
            f"[{int(train_labels.min())}, {int(train_labels.max())}]."
        )


@torch.no_grad()
def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Weighted k-NN vote. Returns ``(predictions, scores)``.

    Args:
        train_features: ``(N, D)`` float features of the labelled reference set (any norm; normalised here).
        train_labels: ``(N,)`` integer labels in ``[0, num_classes)``.
        test_features: ``(M, D)`` features to classify.
        num_classes: number of classes C.
        k: neighbours per test row; clamped to N when the training set is smaller.
        temperature: T in the vote weight exp(cosine / T).
        chunk_size: test rows per similarity matrix (memory bound ``chunk_size x N``).

    Returns:
        predictions: ``(M, C)`` long, class indices sorted by decreasing score (column 0 = top-1 prediction).
        scores: ``(M, C)`` float, each class's share of the vote weight (rows sum to 1).

    Computed on ``train_features.device`` in float32 (float64 inputs stay float64).
    """
    _check_inputs(train_features, train_labels, test_features, num_classes)
    if temperature <= 0:
        raise ValueError(f"k-NN temperature must be > 0, got {temperature}.")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    device = train_features.device
    dtype = torch.float64 if train_features.dtype == torch.float64 else torch.float32
    train = F.normalize(train_features.to(dtype), dim=1)
    labels = train_labels.to(device=device, dtype=torch.long)
    k = min(k, train.shape[0])
    predictions, scores = [], []
    for start in range(0, test_features.shape[0], max(1, chunk_size)):
        test = F.normalize(test_features[start : start + chunk_size].to(device=device, dtype=dtype), dim=1)
        similarity = test @ train.T  # (m, N) cosine similarities
        top_sim, top_idx = similarity.topk(k, dim=1, largest=True, sorted=True)
        weights = torch.softmax(top_sim / temperature, dim=1)  # exp(sim / T), normalised per row
        votes = torch.zeros(test.shape[0], num_classes, device=device, dtype=dtype)
        votes.scatter_add_(1, labels[top_idx], weights)
        scores.append(votes)
        predictions.append(votes.argsort(dim=1, descending=True, stable=True))
    if not scores:  # empty test set
        empty = torch.zeros(0, num_classes, device=device)
        return empty.long(), empty.to(dtype)
    return torch.cat(predictions), torch.cat(scores)


@torch.no_grad()
def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (fractions in [0, 1]) of ``knn_classify`` on labelled test features.

    Top-5 counts a hit when the true class is among the 5 best-scored classes **and received a vote**: when the k
    neighbours name fewer than 5 classes, the remaining places are not filled with unvoted classes (which would be
    hits by index order, not by similarity). Ties are broken by class index (lower first), deterministically.
    """
    if test_labels.ndim != 1 or test_labels.shape[0] != test_features.shape[0]:
        raise ValueError(
            f"test_labels must be 1-D with one label per test row; got shape {tuple(test_labels.shape)} "
            f"for {test_features.shape[0]} rows."
        )
    if test_features.shape[0] == 0:
        raise ValueError("k-NN accuracy needs at least one test sample; the test set is empty.")
    predictions, scores = knn_classify(
        train_features, train_labels, test_features, num_classes, k=k, temperature=temperature, chunk_size=chunk_size
    )
    target = test_labels.to(device=predictions.device, dtype=torch.long).view(-1, 1)
    voted = scores.gather(1, predictions) > 0
    correct = predictions.eq(target) & voted
    top1 = correct[:, :1].any(dim=1).float().mean().item()
    top5 = correct[:, : min(5, num_classes)].any(dim=1).float().mean().item()
    return top1, top5

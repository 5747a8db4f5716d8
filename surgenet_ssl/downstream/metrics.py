"""Downstream metrics from confusion matrices and ranked scores: per-class IoU / Dice and mIoU (segmentation),
accuracy / macro-F1 / per-class F1 (single-label classification), per-criterion AP and mAP (multi-label).

Conventions (those of mmsegmentation / scikit-learn, so numbers compare with published tables):

- Segmentation metrics are computed from one confusion matrix summed over **all pixels of the split** (not a mean of
  per-image scores). Pixels labelled ``ignore_index`` are left out. A class that appears neither in the ground truth
  nor in the predictions has an undefined IoU/Dice (``nan``, written as ``null``) and is left out of the means; a
  class that is predicted but absent from the ground truth scores 0.
- Macro-F1 averages the classes that occur in the targets or the predictions (scikit-learn's default labels).
- AP is the area under the step-wise precision-recall curve, ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score
  thresholds (scikit-learn's ``average_precision_score``); a criterion without positive samples has no AP (``nan``)
  and is left out of mAP.

Everything works on CPU tensors or arrays and never reads the GPU more than once per call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "confusion_matrix",
    "segmentation_metrics",
    "classification_metrics",
    "average_precision",
    "multilabel_metrics",
    "nan_to_none",
]


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = 255) -> Tensor:
    """``(C, C)`` int64 counts, rows = ground truth, columns = prediction; ``ignore_index`` targets are skipped.

    ``pred`` and ``target`` hold class indices of the same shape (any shape). Targets outside ``[0, C)`` other than
    ``ignore_index`` raise (the datasets check masks earlier, naming the file).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(
            f"target class ids must lie in [0, {num_classes - 1}]; found [{int(target.min())}, {int(target.max())}]"
        )
    counts = torch.bincount(target * num_classes + pred.clamp(0, num_classes - 1), minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes)


def _ratios(cm: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    counts = cm.detach().cpu().double().numpy()
    tp = np.diag(counts)
    fp = counts.sum(0) - tp
    fn = counts.sum(1) - tp
    return tp, fp, fn


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _named(values: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    return {str(n): float(v) for n, v in zip(names, values, strict=True)}


def segmentation_metrics(cm: Tensor, class_names: Sequence[str]) -> dict:
    """Per-class IoU and Dice, mIoU, mDice and pixel accuracy from a summed confusion matrix."""
    tp, fp, fn = _ratios(cm)
    iou = _safe_div(tp, tp + fp + fn)
    dice = _safe_div(2 * tp, 2 * tp + fp + fn)
    total = tp.sum() + fp.sum()  # every counted pixel once (fp sums the off-diagonal)
    return {
        "mIoU": _nanmean(iou),
        "mDice": _nanmean(dice),
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "iou": _named(iou, class_names),
        "dice": _named(dice, class_names),
        "pixels": int(total),
    }


def classification_metrics(cm: Tensor, class_names: Sequence[str]) -> dict:
    """Accuracy, macro-F1 and per-class F1 / precision / recall / support from a confusion matrix."""
    tp, fp, fn = _ratios(cm)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    total = tp.sum() + fp.sum()
    return {
        "accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "macro_f1": _nanmean(f1),
        "f1": _named(f1, class_names),
        "precision": _named(_safe_div(tp, tp + fp), class_names),
        "recall": _named(_safe_div(tp, tp + fn), class_names),
        "support": {str(n): int(v) for n, v in zip(class_names, tp + fn, strict=True)},
        "samples": int(total),
    }


def average_precision(scores, targets) -> float:
    """AP of one criterion: ``scores`` (N,) real, ``targets`` (N,) in {0, 1}; ``nan`` without positives.

    ``sum_n (R_n - R_{n-1}) P_n`` with one step per distinct score (tied scores form one threshold).
    """
    s = np.asarray(scores.detach().cpu() if isinstance(scores, Tensor) else scores, dtype=np.float64).reshape(-1)
    t = np.asarray(targets.detach().cpu() if isinstance(targets, Tensor) else targets, dtype=np.float64).reshape(-1)
    if s.shape != t.shape:
        raise ValueError(f"scores {s.shape} and targets {t.shape} differ in length")
    if not np.isin(t, (0.0, 1.0)).all():
        raise ValueError("multi-label targets must be 0 or 1")
    positives = t.sum()
    if positives == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, t = s[order], t[order]
    tp = np.cumsum(t)
    fp = np.cumsum(1 - t)
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # the end of each group of equal scores
    tp, fp = tp[last_of_tie], fp[last_of_tie]
    precision = tp / (tp + fp)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def multilabel_metrics(scores: Tensor, targets: Tensor, criteria: Sequence[str]) -> dict:
    """Per-criterion AP and mAP (plus per-criterion positives) for ``(N, K)`` scores and 0/1 targets."""
    if scores.ndim != 2 or scores.shape != targets.shape or scores.shape[1] != len(criteria):
        raise ValueError(
            f"expected (N, {len(criteria)}) scores and targets; got {tuple(scores.shape)} and {tuple(targets.shape)}"
        )
    ap = np.array([average_precision(scores[:, k], targets[:, k]) for k in range(len(criteria))])
    return {
        "mAP": _nanmean(ap),
        "ap": _named(ap, criteria),
        "positives": {str(c): int(targets[:, k].sum()) for k, c in enumerate(criteria)},
        "samples": int(scores.shape[0]),
    }


def nan_to_none(obj):
    """JSON-safe copy: ``nan`` / ``inf`` -> ``None`` (JSON has no NaN), recursively."""
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj

"""Downstream metrics from confusion matrices and ranked scores: per-class IoU / Dice and mIoU (segmentation),
accuracy / macro-F1 / per-class F1 (single-label classification), per-criterion AP, mAP and balanced accuracy
(multi-label), and phase recognition per video in the Cholec80 convention.

Each number follows a named community convention (``CONVENTIONS``; results.json repeats the ones it used), so it
can be put next to published tables:

- Segmentation mIoU / mDice come from one confusion matrix summed over **all pixels of the split**
  (mmsegmentation). Pixels labelled ``ignore_index`` are left out; the background class is a class like any other. A
  class in neither ground truth nor predictions is undefined (``nan`` -> ``null``) and left out of the means; one
  predicted but absent from the ground truth scores 0. :func:`per_image_dice` is the per-image alternative (MONAI).
- Accuracy and macro-F1 pool all frames of the split; macro-F1 averages the classes in the targets or predictions
  (scikit-learn's default labels). :func:`phase_metrics` gives the per-video Cholec80 figures.
- AP is the area under the step-wise precision-recall curve, ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score
  thresholds (scikit-learn's ``average_precision_score``). A criterion without positives in the split has an
  undefined AP; mAP counts it as 0 (scikit-learn, torchmetrics) or leaves it out (``absent_labels="skip"``).

Everything works on CPU tensors or arrays and never reads the GPU more than once per call.
"""

from __future__ import annotations

import math
import re
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
    "balanced_accuracy",
    "per_image_dice",
    "phase_metrics",
    "video_order",
    "CONVENTIONS",
    "metric_conventions",
    "nan_to_none",
]


#: What each convention tag in results.json (``metrics.convention``) and report column headers means.
CONVENTIONS = {
    "dataset-level": "one confusion matrix summed over all pixels of the split, then per-class IoU / Dice and their "
    "mean over classes (mmsegmentation); background counts as a class; classes in neither ground truth nor "
    "predictions left out",
    "per-image": "Dice per image and class, classes absent from the image's ground truth skipped, mean over classes "
    "then over images (MONAI DiceMetric defaults); background counts as a class",
    "pooled": "all frames of the split in one confusion matrix (scikit-learn); macro-F1 averages the classes present "
    "in targets or predictions",
    "per-video strict": "Cholec80 (Main.m / Evaluate.m) without relaxation: accuracy per video, mean over videos; "
    "precision / recall / Jaccard / F1 per phase within each video (nan where absent), mean over videos, then phases",
    "per-video relaxed": "Cholec80 Evaluate.m relaxed boundary (metrics.boundary_seconds, 10 s): transitions to an "
    "adjacent phase at a phase start forgiven, as the script does; otherwise like per-video strict",
    "absent=0": "a label without positives in the split counts as AP 0 in mAP (scikit-learn, torchmetrics)",
    "absent skipped": "a label without positives in the split is left out of mAP",
    "threshold 0.5": "per label, predictions score >= 0.5; balanced accuracy = mean recall of the classes present "
    "(scikit-learn), then mean over labels",
    "DINO k-NN": "DINO weighted k-NN on L2-normalised features (eval_knn.py); top-5 never credits a class without "
    "a vote",
    "logistic": "standardised features, L2 logistic regression fitted by L-BFGS (scikit-learn): for comparing "
    "backbones, not the DINO paper's linear evaluation",
    "DINO linear": "DINO eval_linear.py: frozen backbone (ViT: CLS tokens of the last n blocks), linear layer trained "
    "with SGD momentum 0.9, lr 0.001 x batch / 256, cosine, random-resized-crop + flip; best validation accuracy",
}


def metric_conventions(task: str, multilabel: bool = False, absent_labels: str = "zero", **extra: bool) -> dict:
    """The ``metrics`` block of a finetune results.json: each reported metric -> its convention tag, and the tags'
    definitions. ``extra``: ``per_video``, ``per_image_dice`` when those were computed."""
    if task == "segmentation":
        tags = {k: "dataset-level" for k in ("mIoU", "mDice", "pixel_accuracy", "iou", "dice")}
        if extra.get("per_image_dice"):
            tags |= {"mDice_per_image": "per-image", "dice_per_image": "per-image"}
    elif multilabel:
        absent = "absent=0" if absent_labels == "zero" else "absent skipped"
        tags = {"mAP": absent, "ap": absent}
        tags |= {"balanced_accuracy": "threshold 0.5", "balanced_accuracy_per_label": "threshold 0.5"}
    else:
        tags = {k: "pooled" for k in ("accuracy", "macro_f1", "f1", "precision", "recall")}
        if extra.get("per_video"):
            tags |= {"per_video.strict": "per-video strict", "per_video.relaxed": "per-video relaxed"}
    return {"convention": tags, "definitions": {t: CONVENTIONS[t] for t in dict.fromkeys(tags.values())}}


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


def balanced_accuracy(scores, targets, threshold: float = 0.5) -> float:
    """Mean recall of the classes present in ``targets`` (scikit-learn's ``balanced_accuracy_score``) for 0/1
    ``targets`` and predictions ``scores >= threshold``; with one class only present it is that class's recall."""
    s = np.asarray(scores.detach().cpu() if isinstance(scores, Tensor) else scores, dtype=np.float64).reshape(-1)
    t = np.asarray(targets.detach().cpu() if isinstance(targets, Tensor) else targets, dtype=np.float64).reshape(-1)
    if s.size == 0:
        return float("nan")
    pred = s >= threshold
    recalls = [np.mean(pred[t == c] == bool(c)) for c in (0.0, 1.0) if np.any(t == c)]
    return float(np.mean(recalls))


def multilabel_metrics(
    scores: Tensor, targets: Tensor, criteria: Sequence[str], absent_labels: str = "zero", threshold: float = 0.5
) -> dict:
    """Per-criterion AP, mAP, balanced accuracy (scores thresholded at ``threshold``) and positives for ``(N, K)``
    scores and 0/1 targets.

    ``absent_labels``: how mAP treats a criterion without positives in the split (its own AP stays ``nan``):
    ``zero`` counts it as AP 0 (scikit-learn, torchmetrics), ``skip`` leaves it out of the mean.
    """
    if scores.ndim != 2 or scores.shape != targets.shape or scores.shape[1] != len(criteria):
        raise ValueError(
            f"expected (N, {len(criteria)}) scores and targets; got {tuple(scores.shape)} and {tuple(targets.shape)}"
        )
    if absent_labels not in ("zero", "skip"):
        raise ValueError(f"metrics.absent_labels must be zero or skip, got {absent_labels!r}")
    ap = np.array([average_precision(scores[:, k], targets[:, k]) for k in range(len(criteria))])
    balanced = np.array([balanced_accuracy(scores[:, k], targets[:, k], threshold) for k in range(len(criteria))])
    absent = [str(c) for c, v in zip(criteria, ap, strict=True) if math.isnan(v)]
    return {
        "mAP": _nanmean(np.nan_to_num(ap, nan=0.0) if absent_labels == "zero" else ap),
        "ap": _named(ap, criteria),
        "labels_without_positives": absent,
        "balanced_accuracy": _nanmean(balanced),
        "balanced_accuracy_per_label": _named(balanced, criteria),
        "positives": {str(c): int(targets[:, k].sum()) for k, c in enumerate(criteria)},
        "samples": int(scores.shape[0]),
    }


def per_image_dice(cm: Tensor) -> np.ndarray:
    """Dice of each class in one image's ``(C, C)`` confusion matrix; ``nan`` where the class is absent from the
    image's ground truth (MONAI ``DiceMetric`` with ``ignore_empty=True``, its default)."""
    tp, fp, fn = _ratios(cm)
    present = (tp + fn) > 0
    return np.where(present, _safe_div(2 * tp, 2 * tp + fp + fn), np.nan)


def per_image_dice_summary(dice: np.ndarray, class_names: Sequence[str]) -> dict:
    """``(images, C)`` per-image Dice -> per-class means over the images holding the class, and mDice: each image's
    mean over its classes, averaged over images (MONAI's ``mean`` reduction)."""
    if dice.size == 0:
        return {
            "mDice_per_image": float("nan"),
            "dice_per_image": _named(np.full(len(class_names), np.nan), class_names),
        }
    with np.errstate(invalid="ignore"):
        per_image = np.array([_nanmean(row) for row in dice])
        per_class = np.array([_nanmean(col) for col in dice.T])
    return {"mDice_per_image": _nanmean(per_image), "dice_per_image": _named(per_class, class_names)}


# ------------------------------------------------------------------------------------------- phase recognition
# The relaxed rules of the Cholec80 evaluation script (Evaluate.m): differences (prediction - ground truth, in
# phase index order) forgiven in the first / last `boundary` frames of a ground-truth phase segment.
_RELAX_DEFAULT = ((-1,), (1,))
_RELAX_CHOLEC80 = {3: ((-1,), (1, 2)), 4: ((-1,), (1, 2)), 5: ((-1, -2), (1, 2)), 6: ((-1, -2), (1, 2))}


_INTEGERS = re.compile(r"\d+")


def _segments(labels: np.ndarray) -> list[tuple[int, int]]:
    """``(start, end)`` (inclusive) of every run of equal labels."""
    cuts = np.flatnonzero(np.diff(labels)) + 1
    starts = np.r_[0, cuts]
    ends = np.r_[cuts - 1, labels.size - 1]
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def _relaxed_difference(gt: np.ndarray, pred: np.ndarray, boundary: int, cholec80_rules: bool) -> np.ndarray:
    """Evaluate.m's ``updatedDiff``: ``pred - gt`` with the forgiven transitions set to 0.

    As in the script, both masks are applied to the segment's first ``boundary`` frames: MATLAB indexes
    ``curDiff(curDiff(end-t+1:end)==1)`` with a mask of length t, which addresses the first t elements. The end of
    a segment is therefore not relaxed; published Cholec80 "relaxed" numbers were computed this way.
    """
    diff = pred - gt
    out = diff.copy()
    for start, end in _segments(gt):
        cur = diff[start : end + 1].copy()
        t = min(boundary, cur.size)
        late, early = _RELAX_CHOLEC80.get(int(gt[start]), _RELAX_DEFAULT) if cholec80_rules else _RELAX_DEFAULT
        head_mask = np.isin(cur[:t], late)
        tail_mask = np.isin(cur[cur.size - t :], early)
        cur[:t][head_mask] = 0
        cur[:t][tail_mask] = 0
        out[start : end + 1] = cur
    return out


def _video_scores(gt: np.ndarray, pred: np.ndarray, num_classes: int, updated: np.ndarray) -> dict[str, np.ndarray]:
    """Per-phase Jaccard / precision / recall / F1 and the accuracy of one video (Evaluate.m; values > 1 clipped to
    1 and phases absent from the ground truth ``nan`` as in Main.m)."""
    jac, prec, rec = (np.full(num_classes, np.nan) for _ in range(3))
    correct = updated == 0
    for c in range(num_classes):
        in_gt, in_pred = gt == c, pred == c
        if not in_gt.any():
            continue
        union = in_gt | in_pred
        tp = float(np.sum(correct[union]))
        jac[c] = tp / union.sum()
        prec[c] = tp / in_pred.sum() if in_pred.any() else (np.inf if tp > 0 else np.nan)
        rec[c] = tp / in_gt.sum()
    jac, prec, rec = (np.minimum(v, 1.0) for v in (jac, prec, rec))  # nan stays nan
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(np.isnan(prec) & ~np.isnan(rec), 0.0, 2 * prec * rec / (prec + rec))
        f1 = np.where((prec + rec) == 0, 0.0, f1)
    return {"jaccard": jac, "precision": prec, "recall": rec, "f1": f1, "accuracy": np.array(correct.mean())}


def _std(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.std(ddof=1)) if finite.size >= 2 else float("nan")


def phase_metrics(
    pred,
    target,
    videos: Sequence[str],
    class_names: Sequence[str],
    fps: float = 1.0,
    boundary_seconds: float = 10.0,
    cholec80_rules: bool | None = None,
) -> dict:
    """Phase recognition per video, the Cholec80 convention (the challenge's ``Main.m`` / ``Evaluate.m``).

    ``pred`` / ``target`` are class indices in temporal order within each video (``videos[i]`` names frame i's
    video; frames ``1 / fps`` seconds apart). For each video: accuracy, and per phase Jaccard, precision and recall
    (``nan`` where the phase is absent from the video's ground truth; precision ``nan`` where it is never
    predicted and nothing is forgiven) and F1 = 2PR / (P + R). Each phase's figure is averaged over the videos that
    define it, then the phases are averaged (``*_std_over_phases``: std of those phase means, as Main.m prints);
    accuracy is averaged over videos (``accuracy_std_over_videos``). ``strict`` scores frame by frame; ``relaxed``
    forgives transitions to an adjacent phase within ``boundary_seconds`` of a phase boundary like Evaluate.m
    (with its Cholec80 exceptions for phases 4-7 when ``cholec80_rules``; default: the classes are the 7 Cholec80
    phases). std uses ddof=1 (MATLAB's ``std``).
    """
    p = np.asarray(pred.cpu() if isinstance(pred, Tensor) else pred, dtype=np.int64).reshape(-1)
    t = np.asarray(target.cpu() if isinstance(target, Tensor) else target, dtype=np.int64).reshape(-1)
    if p.shape != t.shape or len(videos) != t.size:
        raise ValueError(
            f"phase metrics need one prediction, target and video per frame: {p.size}, {t.size}, {len(videos)}"
        )
    if cholec80_rules is None:
        from .classification_data import CHOLEC80_PHASES

        cholec80_rules = tuple(class_names) == CHOLEC80_PHASES
    boundary = max(0, int(round(boundary_seconds * fps)))
    names = list(dict.fromkeys(str(v) for v in videos))
    index = {name: np.flatnonzero(np.asarray([str(v) for v in videos]) == name) for name in names}
    k = len(class_names)
    out: dict = {"videos": len(names), "boundary_frames": boundary, "cholec80_rules": bool(cholec80_rules)}
    for variant in ("strict", "relaxed"):
        per_video = []
        for name in names:
            gt, pr = t[index[name]], p[index[name]]
            updated = pr - gt if variant == "strict" else _relaxed_difference(gt, pr, boundary, cholec80_rules)
            per_video.append(_video_scores(gt, pr, k, updated))
        acc = np.array([float(v["accuracy"]) for v in per_video])
        block: dict = {"accuracy": float(acc.mean()), "accuracy_std_over_videos": _std(acc)}
        per_phase: dict = {}
        for key in ("jaccard", "precision", "recall", "f1"):
            table = np.stack([v[key] for v in per_video])  # (videos, phases)
            with np.errstate(invalid="ignore"):
                phase_means = np.array([_nanmean(col) for col in table.T])
            block[key] = _nanmean(phase_means)
            block[f"{key}_std_over_phases"] = _std(phase_means)
            per_phase[key] = _named(phase_means, class_names)
        block["per_phase"] = per_phase
        block["per_video_accuracy"] = dict(zip(names, acc.tolist(), strict=True))
        out[variant] = block
    return out


def video_order(keys: Sequence[str], videos: Sequence[str | None]) -> list[int]:
    """Indices that put frames in temporal order: by video (first appearance), then by the frame number in the
    file name (its last integer, so ``frame_9`` comes before ``frame_10``), then by name."""
    first: dict[str | None, int] = {}
    for v in videos:
        first.setdefault(v, len(first))

    def key(i: int):
        numbers = _INTEGERS.findall(keys[i])
        return (first[videos[i]], int(numbers[-1]) if numbers else -1, keys[i])

    return sorted(range(len(keys)), key=key)


def nan_to_none(obj):
    """JSON-safe copy: ``nan`` / ``inf`` -> ``None`` (JSON has no NaN), recursively."""
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj

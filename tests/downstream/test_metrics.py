"""Downstream metrics against hand-computed values (and scikit-learn where it defines the convention)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from surgenet_ssl.downstream.metrics import (
    average_precision,
    classification_metrics,
    confusion_matrix,
    multilabel_metrics,
    nan_to_none,
    segmentation_metrics,
)


def test_confusion_matrix_rows_are_targets_and_ignore_index_is_skipped():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    cm = confusion_matrix(pred, target, 3, ignore_index=255)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]  # the ignored pixel (pred 2) is not counted
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 2\]"):
        confusion_matrix(pred, torch.tensor([[0, 0, 1], [1, 3, 0]]), 3)


def test_segmentation_iou_dice_by_hand():
    # target / prediction over 8 pixels, 3 classes; class 2 is never in the ground truth but predicted once
    target = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    pred = torch.tensor([0, 0, 0, 1, 1, 1, 2, 0])
    m = segmentation_metrics(confusion_matrix(pred, target, 3), ["bg", "tool", "ghost"])
    # class 0: TP 3, FP 1 (pixel 7), FN 1 (pixel 3) -> IoU 3/5, Dice 6/8
    # class 1: TP 2, FP 1 (pixel 3), FN 2 (pixels 6, 7) -> IoU 2/5, Dice 4/7
    # class 2: TP 0, FP 1 -> IoU 0, Dice 0 (predicted but absent: counts as 0)
    assert m["iou"] == pytest.approx({"bg": 0.6, "tool": 0.4, "ghost": 0.0})
    assert m["dice"] == pytest.approx({"bg": 0.75, "tool": 4 / 7, "ghost": 0.0})
    assert m["mIoU"] == pytest.approx((0.6 + 0.4 + 0.0) / 3)
    assert m["mDice"] == pytest.approx((0.75 + 4 / 7) / 3)
    assert m["pixel_accuracy"] == pytest.approx(5 / 8) and m["pixels"] == 8


def test_class_absent_everywhere_is_undefined_and_left_out_of_the_mean():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 0, 1, 0])
    m = segmentation_metrics(confusion_matrix(pred, target, 3), ["a", "b", "c"])
    assert math.isnan(m["iou"]["c"]) and math.isnan(m["dice"]["c"])
    # a: TP 2 FP 1 -> 2/3; b: TP 1 FN 1 -> 1/2; the mean is over a and b only
    assert m["mIoU"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert nan_to_none(m)["iou"]["c"] is None


def test_classification_accuracy_macro_f1_by_hand_and_as_sklearn():
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    p = torch.tensor([0, 0, 1, 1, 2, 2])
    m = classification_metrics(confusion_matrix(p, y, 4, ignore_index=None), ["a", "b", "c", "never"])
    # a: TP2 FP0 FN1 -> F1 4/5; b: TP1 FP1 FN1 -> 1/2; c: TP1 FP1 FN0 -> 2/3; "never" absent -> undefined
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1"]["a"] == pytest.approx(0.8) and m["f1"]["b"] == pytest.approx(0.5)
    assert m["f1"]["c"] == pytest.approx(2 / 3) and math.isnan(m["f1"]["never"])
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["support"] == {"a": 3, "b": 2, "c": 1, "never": 0}
    from sklearn.metrics import f1_score

    assert m["macro_f1"] == pytest.approx(f1_score(y.numpy(), p.numpy(), average="macro"))


def test_average_precision_by_hand_with_ties_and_against_sklearn():
    # ranks: 0.9 (+) P=1 R=.5; 0.8 (-); 0.7 (+) P=2/3 R=1 -> AP = .5 * 1 + .5 * 2/3
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(0.5 + 1 / 3)
    # a tie at 0.9 between a positive and a negative is one threshold: P=1/2 at R=1/2, then P=2/3 at R=1
    assert average_precision([0.9, 0.9, 0.1], [1, 0, 1]) == pytest.approx(0.25 + 1 / 3)
    assert math.isnan(average_precision([0.3, 0.2], [0, 0]))
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 50) / 4.0  # many ties
    targets = rng.integers(0, 2, 50)
    assert average_precision(scores, targets) == pytest.approx(average_precision_score(targets, scores))


def test_multilabel_map_can_skip_criteria_without_positives():
    scores = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.8, 0.4], [0.7, 0.6, 0.3]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 0]])
    m = multilabel_metrics(scores, targets, ["c1", "c2", "c3"], absent_labels="skip")
    # c1: 0.9 (+) -> AP 1; c2: 0.8 (+) P1, 0.6 (+) P1 -> AP 1; c3: no positive -> undefined
    assert m["ap"]["c1"] == pytest.approx(1.0) and m["ap"]["c2"] == pytest.approx(1.0)
    assert math.isnan(m["ap"]["c3"]) and m["mAP"] == pytest.approx(1.0)
    assert m["positives"] == {"c1": 1, "c2": 2, "c3": 0}
    with pytest.raises(ValueError, match="0 or 1"):
        average_precision([0.1, 0.2], [0, 2])

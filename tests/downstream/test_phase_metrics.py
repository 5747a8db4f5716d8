"""Phase recognition per video (Cholec80 convention), mAP with absent labels, balanced accuracy and per-image Dice,
against hand-computed values and a line-by-line port of the challenge's Evaluate.m / Main.m."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from surgenet_ssl.downstream.classification_data import CHOLEC80_PHASES
from surgenet_ssl.downstream.metrics import (
    classification_metrics,
    confusion_matrix,
    multilabel_metrics,
    per_image_dice,
    per_image_dice_summary,
    phase_metrics,
    video_order,
)


# ---------------------------------------------------------------- a port of Evaluate.m / Main.m, MATLAB semantics
def _bwconncomp_1d(mask):
    """MATLAB bwconncomp on a vector: lists of 1-based indices of each run of True."""
    runs, current = [], []
    for i, v in enumerate(mask, start=1):
        if v:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _matlab_logical_assign(vec, mask, value):
    """``vec(mask) = value`` with a logical mask shorter than vec: MATLAB addresses the first numel(mask) elements."""
    for i, m in enumerate(mask):
        if m:
            vec[i] = value


def evaluate_m(gt_1based, pred_1based, fps, relaxed=True):
    """Evaluate.m (1-based phases 1..7): jaccard, prec, rec per phase (in %) and acc (in %)."""
    gt, pred = list(gt_1based), list(pred_1based)
    n = len(gt)
    diff = [p - g for p, g in zip(pred, gt, strict=True)]
    updated = [0] * n
    if not relaxed:
        updated = list(diff)
    else:
        ori_t = 10 * fps
        for phase in range(1, 8):
            for conn in _bwconncomp_1d([g == phase for g in gt]):
                s, e = min(conn), max(conn)
                cur = diff[s - 1 : e]
                t = min(ori_t, len(cur))
                head = cur[:t]
                tail = cur[len(cur) - t :]
                if phase in (4, 5):
                    _matlab_logical_assign(cur, [d == -1 for d in head], 0)
                    _matlab_logical_assign(cur, [d in (1, 2) for d in tail], 0)
                elif phase in (6, 7):
                    _matlab_logical_assign(cur, [d in (-1, -2) for d in head], 0)
                    _matlab_logical_assign(cur, [d in (1, 2) for d in tail], 0)
                else:
                    _matlab_logical_assign(cur, [d == -1 for d in head], 0)
                    _matlab_logical_assign(cur, [d == 1 for d in tail], 0)
                updated[s - 1 : e] = cur
    res, prec, rec = [], [], []
    for phase in range(1, 8):
        gt_idx = {i for i, g in enumerate(gt, start=1) if g == phase}
        pred_idx = {i for i, p in enumerate(pred, start=1) if p == phase}
        if not gt_idx:
            res.append(math.nan), prec.append(math.nan), rec.append(math.nan)
            continue
        union = gt_idx | pred_idx
        tp = sum(1 for i in union if updated[i - 1] == 0)
        res.append(tp / len(union) * 100)
        sum_pred = len(pred_idx)
        prec.append(math.nan if sum_pred == 0 and tp == 0 else math.inf if sum_pred == 0 else tp * 100 / sum_pred)
        rec.append(tp * 100 / len(gt_idx))
    acc = sum(1 for d in updated if d == 0) / n * 100
    return res, prec, rec, acc


def main_m(videos, fps, relaxed=True):
    """Main.m: clip > 100, nanmean over videos per phase, mean over phases, std over phases; acc mean/std."""
    cols = [evaluate_m(gt, pred, fps, relaxed) for gt, pred in videos]
    out = {}
    for j, name in enumerate(("jaccard", "precision", "recall")):
        table = np.array([c[j] for c in cols], dtype=float).T  # phases x videos
        table = np.where(table > 100, 100, table)
        per_phase = np.array([np.nanmean(r) if not np.all(np.isnan(r)) else np.nan for r in table])
        out[name] = np.nanmean(per_phase) / 100
        out[name + "_std"] = np.nanstd(per_phase, ddof=1) / 100
        out[name + "_per_phase"] = per_phase / 100
    acc = np.array([c[3] for c in cols])
    out["accuracy"], out["accuracy_std"] = acc.mean() / 100, acc.std(ddof=1) / 100
    return out


def _flatten(videos):
    pred = np.concatenate([np.asarray(p) - 1 for _, p in videos])
    gt = np.concatenate([np.asarray(g) - 1 for g, _ in videos])
    names = [f"v{i}" for i, (g, _) in enumerate(videos) for _ in g]
    return pred, gt, names


# --------------------------------------------------------------------------------------------------- the tests
def test_issue_example_pooled_vs_video_mean():
    # video a: 90 of 100 frames right; video b: 5 of 10
    gt = np.zeros(110, dtype=int)
    pred = np.zeros(110, dtype=int)
    pred[90:100] = 1
    pred[105:110] = 1
    videos = ["a"] * 100 + ["b"] * 10
    pooled = classification_metrics(confusion_matrix(torch.tensor(pred), torch.tensor(gt), 2, None), ["x", "y"])
    m = phase_metrics(pred, gt, videos, ["x", "y"], fps=1)
    assert pooled["accuracy"] == pytest.approx(95 / 110) and round(pooled["accuracy"], 3) == 0.864
    assert m["strict"]["accuracy"] == pytest.approx(0.7)
    assert m["strict"]["accuracy_std_over_videos"] == pytest.approx(np.std([0.9, 0.5], ddof=1))
    assert m["strict"]["per_video_accuracy"] == pytest.approx({"a": 0.9, "b": 0.5})
    # phase y never occurs in the ground truth: nan for it in both videos, so the means are phase x's alone
    assert math.isnan(m["strict"]["per_phase"]["jaccard"]["y"])
    # phase x: a: TP 90, union 100 -> 0.9, precision 1, recall 0.9; b: TP 5, union 10 -> 0.5, P 1, R 0.5
    assert m["strict"]["jaccard"] == pytest.approx(0.7)
    assert m["strict"]["precision"] == pytest.approx(1.0) and m["strict"]["recall"] == pytest.approx(0.7)
    assert m["strict"]["f1"] == pytest.approx((2 * 0.9 / 1.9 + 2 * 0.5 / 1.5) / 2)


def test_phase_absent_from_one_video_is_nan_there_and_averaged_over_the_others():
    # video a: phases 0,0,1,1 predicted 0,1,1,1; video b: phase 0 only, all right
    pred = np.array([0, 1, 1, 1, 0, 0])
    gt = np.array([0, 0, 1, 1, 0, 0])
    m = phase_metrics(pred, gt, ["a"] * 4 + ["b"] * 2, ["p0", "p1"], fps=1, boundary_seconds=0)
    s = m["strict"]
    # phase 0: a: J 1/2, P 1, R 1/2; b: J 1, P 1, R 1 -> means 3/4, 1, 3/4
    # phase 1: a: J 2/3, P 2/3, R 1; b: absent (nan) -> 2/3, 2/3, 1
    assert s["per_phase"]["jaccard"] == pytest.approx({"p0": 0.75, "p1": 2 / 3})
    assert s["per_phase"]["precision"] == pytest.approx({"p0": 1.0, "p1": 2 / 3})
    assert s["per_phase"]["recall"] == pytest.approx({"p0": 0.75, "p1": 1.0})
    assert s["jaccard"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert s["jaccard_std_over_phases"] == pytest.approx(np.std([0.75, 2 / 3], ddof=1))
    assert s["accuracy"] == pytest.approx((3 / 4 + 1) / 2)


def test_relaxed_forgives_a_late_transition_at_a_phase_start_only():
    # 1 fps, 3 s boundary. gt: 0 x5 then 1 x5. A late transition (still 0 in the first 2 frames of phase 1) is
    # forgiven; an early one (1 in the last 2 frames of phase 0) is not: Evaluate.m applies its end mask to the
    # segment's first frames.
    gt = np.array([0] * 5 + [1] * 5)
    late = np.array([0] * 7 + [1] * 3)
    early = np.array([0] * 3 + [1] * 7)
    names = ["v"] * 10
    m_late = phase_metrics(late, gt, names, ["a", "b"], fps=1, boundary_seconds=3)
    m_early = phase_metrics(early, gt, names, ["a", "b"], fps=1, boundary_seconds=3)
    assert m_late["strict"]["accuracy"] == pytest.approx(0.8) and m_late["relaxed"]["accuracy"] == pytest.approx(1.0)
    assert m_early["strict"]["accuracy"] == pytest.approx(0.8) and m_early["relaxed"]["accuracy"] == pytest.approx(0.8)
    # relaxed, late: phase a's union is frames 0-6 (5 true + 2 forgiven), all counted as TP: J 7/7, R 7/5 -> 1
    assert m_late["relaxed"]["per_phase"]["jaccard"]["a"] == pytest.approx(1.0)
    assert m_late["relaxed"]["per_phase"]["recall"]["a"] == pytest.approx(1.0)
    assert m_late["boundary_frames"] == 3


@pytest.mark.parametrize("seed", range(6))
def test_matches_a_port_of_the_official_cholec80_scripts(seed):
    rng = np.random.default_rng(seed)
    videos = []
    for _ in range(4):
        # a realistic phase sequence (some phases skipped, one revisited) with noisy, shifted predictions
        order = [1, 2, 3, 4, 5, 6, 7] if seed % 2 else [1, 2, 3, 4, 6, 5, 6, 7]
        order = [p for p in order if rng.random() > 0.15] or [1, 2]
        gt = np.concatenate([[p] * int(rng.integers(3, 40)) for p in order])
        pred = np.roll(gt, int(rng.integers(-6, 7)))
        noise = rng.random(gt.size) < 0.15
        pred[noise] = np.clip(pred[noise] + rng.choice([-2, -1, 1, 2], noise.sum()), 1, 7)
        videos.append((gt, pred))
    pred, gt, names = _flatten(videos)
    fps = 1
    ours = phase_metrics(pred, gt, names, CHOLEC80_PHASES, fps=fps, boundary_seconds=10)
    assert ours["cholec80_rules"]
    for variant, relaxed in (("strict", False), ("relaxed", True)):
        ref = main_m(videos, fps, relaxed)
        got = ours[variant]
        assert got["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
        assert got["accuracy_std_over_videos"] == pytest.approx(ref["accuracy_std"], abs=1e-12)
        for key in ("jaccard", "precision", "recall"):
            assert got[key] == pytest.approx(ref[key], abs=1e-12), (variant, key)
            assert got[f"{key}_std_over_phases"] == pytest.approx(ref[key + "_std"], abs=1e-12)
            per_phase = np.array(list(got["per_phase"][key].values()), dtype=float)
            np.testing.assert_allclose(per_phase, ref[key + "_per_phase"], atol=1e-12)
    assert ours["relaxed"]["accuracy"] >= ours["strict"]["accuracy"]


def test_video_order_sorts_frames_by_their_number_within_each_video():
    keys = ["v2/f_10.png", "v1/f_10.png", "v2/f_9.png", "v1/f_2.png"]
    order = video_order(keys, ["v2", "v1", "v2", "v1"])
    assert [keys[i] for i in order] == ["v2/f_9.png", "v2/f_10.png", "v1/f_2.png", "v1/f_10.png"]


def test_map_absent_label_counts_as_zero_or_is_skipped_as_asked():
    from sklearn.metrics import average_precision_score

    scores = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.8, 0.4], [0.7, 0.6, 0.3]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 0]])
    zero = multilabel_metrics(scores, targets, ["c1", "c2", "c3"])
    skip = multilabel_metrics(scores, targets, ["c1", "c2", "c3"], absent_labels="skip")
    # c1 AP 1, c2 AP 1, c3 no positive: (1 + 1 + 0) / 3 vs (1 + 1) / 2
    assert zero["mAP"] == pytest.approx(2 / 3) and skip["mAP"] == pytest.approx(1.0)
    assert zero["labels_without_positives"] == ["c3"] and math.isnan(zero["ap"]["c3"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns about the label without positives
        assert zero["mAP"] == pytest.approx(average_precision_score(targets.numpy(), scores.numpy(), average="macro"))
    with pytest.raises(ValueError, match="zero or skip"):
        multilabel_metrics(scores, targets, ["c1", "c2", "c3"], absent_labels="nan")


def test_balanced_accuracy_per_criterion_by_hand_and_as_sklearn():
    from sklearn.metrics import balanced_accuracy_score

    scores = torch.tensor([[0.9, 0.2], [0.6, 0.8], [0.3, 0.4], [0.2, 0.1]])
    targets = torch.tensor([[1, 0], [0, 0], [1, 0], [0, 0]])
    m = multilabel_metrics(scores, targets, ["C1", "C3"])
    # C1: positives rows 0, 2 -> predicted 1, 0: TPR 1/2; negatives rows 1, 3 -> predicted 1, 0: TNR 1/2 -> 0.5
    # C3: no positives (never met): only the negatives' recall, rows 1 predicted positive -> 3/4
    assert m["balanced_accuracy_per_label"] == pytest.approx({"C1": 0.5, "C3": 0.75})
    assert m["balanced_accuracy"] == pytest.approx(0.625)
    import warnings

    for k in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true" (C3)
            ref = balanced_accuracy_score(targets[:, k].numpy(), (scores[:, k] >= 0.5).int().numpy())
        assert m["balanced_accuracy_per_label"][["C1", "C3"][k]] == pytest.approx(ref)


def test_per_image_dice_by_hand_differs_from_dataset_level():
    # image 1: class 1 fills 2 of 4 pixels, predicted on 1 of them; image 2: class 1 only 1 of 100 pixels, missed
    t1, p1 = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 0])
    t2 = torch.zeros(100, dtype=torch.long)
    t2[0] = 1
    p2 = torch.zeros(100, dtype=torch.long)
    d1, d2 = per_image_dice(confusion_matrix(p1, t1, 3)), per_image_dice(confusion_matrix(p2, t2, 3))
    # image 1: class 0 TP 2 FP 1 -> 4/5; class 1 TP 1 FN 1 -> 2/3; class 2 absent -> nan
    np.testing.assert_allclose(d1[:2], [0.8, 2 / 3])
    assert math.isnan(d1[2])
    # image 2: class 0 TP 99 FP 1 -> 198/199; class 1 TP 0 FN 1 -> 0
    np.testing.assert_allclose(d2[:2], [198 / 199, 0.0])
    summary = per_image_dice_summary(np.stack([d1, d2]), ["bg", "tool", "other"])
    assert summary["mDice_per_image"] == pytest.approx(((0.8 + 2 / 3) / 2 + (198 / 199 + 0) / 2) / 2)
    assert summary["dice_per_image"]["tool"] == pytest.approx(1 / 3)
    assert math.isnan(summary["dice_per_image"]["other"])

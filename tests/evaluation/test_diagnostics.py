"""Collapse diagnostics: values on small logits by hand, and the warning on collapsed / healthy teachers."""

from __future__ import annotations

import math

import pytest
import torch

from surgenet_ssl.evaluation import collapse_diagnostics, collapse_warning


def test_values_by_hand():
    # teacher_temp 0.5 and logits (0.5 ln 3, 0) -> p = (3/4, 1/4); the center (1, 1) shifts both logits equally
    t = torch.tensor([[0.5 * math.log(3) + 1, 1.0], [1.0, 0.5 * math.log(3) + 1]])
    s = torch.zeros(4, 2)  # uniform student; rows 2-3 (local crops) are not paired with a teacher row
    m = collapse_diagnostics(t, s, center=torch.tensor([1.0, 1.0]), teacher_temp=0.5, student_temp=0.1)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # 0.56234
    assert m["teacher_entropy"] == pytest.approx(h, abs=1e-6)
    assert m["teacher_entropy"] == pytest.approx(0.56234, abs=1e-5)
    assert m["teacher_mean_entropy"] == pytest.approx(math.log(2), abs=1e-6)  # mean of p is (1/2, 1/2)
    assert m["center_norm"] == pytest.approx(math.sqrt(2), abs=1e-6)
    assert m["kl_teacher_student"] == pytest.approx(math.log(2) - h, abs=1e-6)  # KL(p || uniform) = log 2 - H(p)


def test_no_student_no_kl_and_bad_shapes():
    m = collapse_diagnostics(torch.randn(4, 8))
    assert "kl_teacher_student" not in m and m["center_norm"] == 0.0
    with pytest.raises(ValueError, match="B_s >= 4"):
        collapse_diagnostics(torch.randn(4, 8), torch.randn(2, 8))
    with pytest.raises(ValueError, match="center has 3 entries"):
        collapse_diagnostics(torch.randn(4, 8), center=torch.zeros(3))


K = 256


def test_warning_on_constant_one_hot_teacher():
    t = torch.zeros(32, K)
    t[:, 7] = 1.0  # every image -> prototype 7
    m = collapse_diagnostics(t, t.repeat(5, 1), teacher_temp=0.04)
    assert m["teacher_mean_entropy"] < 1e-6 and m["kl_teacher_student"] >= 0
    msg = collapse_warning(m, K)
    assert msg is not None and "one-hot" in msg and "dino.loss.center_momentum" in msg


def test_warning_on_constant_but_not_peaked_teacher():
    row = torch.randn(K, generator=torch.Generator().manual_seed(0)) * 0.1  # same mid-entropy output for all
    m = collapse_diagnostics(row.repeat(16, 1), teacher_temp=0.04)
    assert 0.2 * math.log(K) < m["teacher_entropy"] < 0.95 * math.log(K)
    assert m["teacher_mean_entropy"] == pytest.approx(m["teacher_entropy"], abs=1e-4)
    msg = collapse_warning(m, K)
    assert msg is not None and "same distribution" in msg


def test_warning_on_uniform_teacher():
    t = torch.randn(32, K, generator=torch.Generator().manual_seed(0)) * 1e-4
    m = collapse_diagnostics(t, t, teacher_temp=0.04)
    assert m["teacher_entropy"] == pytest.approx(math.log(K), abs=1e-3)
    msg = collapse_warning(m, K)
    assert msg is not None and "uniform" in msg and "dino.loss.teacher_temp" in msg
    assert "dino.teacher.momentum" in msg


@pytest.mark.parametrize("batch", [2, 32])
def test_no_warning_on_healthy_teacher(batch):
    # each image strongly prefers its own prototype: sharp per sample, diverse over the batch
    g = torch.Generator().manual_seed(0)
    t = torch.randn(batch, K, generator=g) * 0.05
    t[torch.arange(batch), torch.arange(batch) * 3] += 1.0
    center = t.mean(0)
    m = collapse_diagnostics(t, t + 0.01 * torch.randn(batch, K, generator=g), center=center, teacher_temp=0.04)
    assert m["teacher_entropy"] < 0.5 * math.log(K)
    assert collapse_warning(m, K) is None


def test_thresholds_are_overridable():
    m = {"teacher_entropy": 0.9 * math.log(K), "teacher_mean_entropy": math.log(K)}
    assert collapse_warning(m, K) is None
    assert "uniform" in collapse_warning(m, K, uniform_ratio=0.85)


def test_effective_rank_by_hand():
    from surgenet_ssl.evaluation import effective_rank

    # centred rows with singular values 3*sqrt(2) and sqrt(2): p = (0.75, 0.25), exp(H) = 1.7548
    x = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert effective_rank(x) == pytest.approx(expected, abs=1e-9)
    assert effective_rank(x + 5.0) == pytest.approx(expected, abs=1e-9)  # the shared mean is not a dimension
    eye = torch.cat([torch.eye(6), -torch.eye(6)])  # 6 equal directions
    assert effective_rank(eye) == pytest.approx(6.0, abs=1e-9)
    line = torch.arange(10.0)[:, None] * torch.tensor([[1.0, 2.0, -1.0]])  # every sample on one line
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-9)
    assert effective_rank(torch.ones(4, 3)) == 1.0  # all identical

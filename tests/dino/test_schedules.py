import math

import pytest
import torch

from surgenet_ssl.dino.schedules import cosine_schedule, scaled_lr, teacher_temp_schedule


def test_cosine_schedule_hand_computed_values():
    values = cosine_schedule(1.0, 0.0, total_steps=4)
    expected = [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]
    assert values.tolist() == pytest.approx(expected)


def test_cosine_schedule_linear_warmup_then_cosine():
    values = cosine_schedule(1.0, 0.0, total_steps=6, warmup_steps=2, start_warmup_value=0.0)
    assert values[:2].tolist() == pytest.approx([0.0, 1.0])
    assert values[2:].tolist() == pytest.approx(cosine_schedule(1.0, 0.0, 4).tolist())


def test_weight_decay_schedule_rises_from_004_towards_04():
    wd = cosine_schedule(0.04, 0.4, total_steps=3)
    # final + 0.5 (base - final)(1 + cos(pi i / 3)), i = 0, 1, 2
    assert wd.tolist() == pytest.approx([0.04, 0.4 - 0.18 * 1.5, 0.4 - 0.18 * 0.5])


def test_teacher_momentum_schedule():
    m = cosine_schedule(0.996, 1.0, total_steps=2)
    assert m.tolist() == pytest.approx([0.996, 0.998])


def test_lr_scaling_rule_and_peak_after_warmup():
    peak = scaled_lr(5e-4, 544)
    assert peak == pytest.approx(1.0625e-3)
    lr = cosine_schedule(peak, 1e-6, total_steps=100, warmup_steps=10)
    assert lr[0] == 0.0
    assert lr[5].item() == pytest.approx(peak * 5 / 9)
    assert lr[10].item() == pytest.approx(peak)
    assert torch.all(lr[10:-1] >= lr[11:])  # monotone decay after warmup
    assert lr[-1].item() > 1e-6 and lr[-1].item() < peak * 0.01


def test_teacher_temperature_warmup_then_constant():
    t = teacher_temp_schedule(0.04, 0.07, warmup_steps=4, total_steps=6)
    assert t.tolist() == pytest.approx([0.04, 0.05, 0.06, 0.07, 0.07, 0.07])


def test_invalid_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        cosine_schedule(1.0, 0.0, total_steps=0)

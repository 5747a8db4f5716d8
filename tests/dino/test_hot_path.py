"""GPU-lean hot path of the DINO parts: sync-free per-parameter clipping, official prototype-layer init."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from surgenet_ssl.dino import DINOHead, clip_gradients_per_parameter
from surgenet_ssl.dino.head import WeightNormLinear


def _reference_clip(model: nn.Module, max_norm: float) -> list[float]:
    """The previous implementation (official DINO ``clip_gradients``), kept here as the specification."""
    norms = []
    for p in model.parameters():
        if p.grad is None:
            continue
        norm = p.grad.detach().norm(2)
        norms.append(float(norm))
        coef = max_norm / (norm + 1e-6)
        if coef < 1:
            p.grad.mul_(coef)
    return norms


def _model_with_grads(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LayerNorm(6), nn.Linear(6, 5), nn.Linear(5, 2, bias=False))
    scales = [0.01, 10.0, 0.5, 3.0, 1e-4, 50.0, 2.9999]
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn_like(p) * scales[i % len(scales)]
    model[2].bias.grad = None  # parameters without gradient are skipped
    return model


@pytest.mark.parametrize("max_norm", [3.0, 0.1, 1e9])
def test_foreach_clipping_equals_the_per_parameter_loop(max_norm: float) -> None:
    ours, ref = _model_with_grads(0), _model_with_grads(0)
    total = clip_gradients_per_parameter(ours, max_norm)
    norms = _reference_clip(ref, max_norm)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0.0)
            assert float(a.grad.norm()) <= max_norm * (1 + 1e-5)
    assert isinstance(total, torch.Tensor) and total.ndim == 0
    assert float(total) == pytest.approx(math.sqrt(sum(n * n for n in norms)), rel=1e-5)


def test_clipping_never_reads_a_value_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model_with_grads(1)

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync in the clipping hot path")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    total = clip_gradients_per_parameter(model, 3.0)
    monkeypatch.undo()
    assert float(total) > 3.0


def test_clipping_without_gradients_returns_zero() -> None:
    assert float(clip_gradients_per_parameter(nn.Linear(2, 2), 3.0)) == 0.0


def test_prototype_layer_initialised_like_nn_linear() -> None:
    in_dim, out_dim = 256, 4096
    torch.manual_seed(0)
    ours = WeightNormLinear(in_dim, out_dim).weight_v.detach()
    torch.manual_seed(0)
    ref = nn.Linear(in_dim, out_dim, bias=False).weight.detach()
    assert torch.equal(ours, ref)  # the official head's weight-normed nn.Linear keeps the default init
    rows = ours.norm(dim=1)
    # U(-1/sqrt(d), 1/sqrt(d)) entries: row norm ~ sqrt(1/3) = 0.577 (trunc_normal std 0.02 would give 0.32).
    assert rows.mean().item() == pytest.approx(math.sqrt(1 / 3), rel=0.01)
    assert rows.std().item() < 0.03
    assert ours.abs().max().item() <= 1 / math.sqrt(in_dim)
    head = DINOHead(in_dim=8, out_dim=64, hidden_dim=12, bottleneck_dim=in_dim)
    assert head.last_layer.weight_v.norm(dim=1).mean().item() == pytest.approx(math.sqrt(1 / 3), rel=0.05)
    assert head.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.3)  # the MLP keeps trunc_normal(0.02)
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(64))

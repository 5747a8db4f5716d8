import pytest
import torch
from PIL import Image
from torch import nn

from surgenet_ssl.data.augment import FastMultiCrop
from surgenet_ssl.dino import (
    DINOHead,
    MultiCropWrapper,
    cancel_last_layer_gradients,
    clip_gradients_per_parameter,
    param_groups,
    update_teacher,
)


def test_clipping_is_per_parameter_not_global():
    model = nn.Module()
    model.a = nn.Parameter(torch.zeros(2))
    model.b = nn.Parameter(torch.zeros(2))
    model.a.grad = torch.tensor([3.0, 4.0])  # norm 5 -> scaled to norm 1
    model.b.grad = torch.tensor([0.3, 0.4])  # norm 0.5 -> untouched (a global clip would scale it too)
    total = clip_gradients_per_parameter(model, max_norm=1.0)
    assert float(total) == pytest.approx((5.0**2 + 0.5**2) ** 0.5)  # total norm before clipping, for logging
    assert model.a.grad.tolist() == pytest.approx([0.6, 0.8], rel=1e-5)
    assert model.b.grad.tolist() == pytest.approx([0.3, 0.4])


def test_ema_update_of_parameters_keeps_the_teacher_buffers():
    """Official DINO / DINOv2 EMA: parameters only; a BatchNorm teacher keeps its own running statistics."""
    student, teacher = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        student.weight.fill_(0.0)
        teacher.weight.fill_(1.0)
        student.running_mean.fill_(7.0)
    update_teacher(student, teacher, momentum=0.9)
    assert teacher.weight.tolist() == pytest.approx([0.9, 0.9])
    assert teacher.running_mean.tolist() == [0.0, 0.0] and student.running_mean.tolist() == [7.0, 7.0]
    assert student.weight.tolist() == [0.0, 0.0]


def test_param_groups_exclude_biases_and_1d_from_weight_decay():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    decay, no_decay = param_groups(model)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_head_layout_and_fixed_prototype_norms():
    head = DINOHead(in_dim=8, out_dim=16, hidden_dim=12, bottleneck_dim=4)
    names = [n for n, _ in head.named_parameters()]
    assert names == [
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.2.weight",
        "mlp.2.bias",
        "mlp.4.weight",
        "mlp.4.bias",
        "last_layer.weight_v",
        "last_layer.weight_g",
    ]
    assert not head.last_layer.weight_g.requires_grad
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(16))
    out = head(torch.randn(5, 8))
    assert out.shape == (5, 16)
    # The bottleneck is L2-normalised and prototypes have unit norm: logits are cosines, within [-1, 1].
    assert out.abs().max() <= 1.0 + 1e-5


def test_multicrop_wrapper_one_backbone_pass_per_resolution():
    calls = []

    class Spy(nn.Module):
        def forward(self, x):
            calls.append(tuple(x.shape))
            return x.mean(dim=(2, 3))

    wrapper = MultiCropWrapper(Spy(), nn.Identity())
    crops = [torch.full((2, 3, 8, 8), float(i)) for i in range(2)] + [torch.full((2, 3, 4, 4), 9.0) for _ in range(3)]
    out = wrapper(crops)
    assert calls == [(4, 3, 8, 8), (6, 3, 4, 4)]
    assert out.shape == (10, 3)
    assert out[:, 0].tolist() == [0, 0, 1, 1, 9, 9, 9, 9, 9, 9]  # crop-by-crop order


def test_last_layer_gradients_cancelled_only_during_freeze():
    head = DINOHead(4, 6, hidden_dim=5, bottleneck_dim=3, norm_last_layer=False)
    head(torch.randn(2, 4)).sum().backward()
    assert not cancel_last_layer_gradients(head, epoch=1, freeze_last_layer=1)
    assert head.last_layer.weight_v.grad is not None
    assert cancel_last_layer_gradients(head, epoch=0, freeze_last_layer=1)
    assert head.last_layer.weight_v.grad is None and head.last_layer.weight_g.grad is None
    assert head.mlp[0].weight.grad is not None


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_multicrop_augmentation_crops_and_sizes(mode):
    aug = FastMultiCrop(global_crops_size=32, local_crops_size=16, local_crops_number=3)
    img = Image.new(mode, (40, 30), color=128 if mode == "L" else None)
    crops = aug(img)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(torch.isfinite(c).all() for c in crops)

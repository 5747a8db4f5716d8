"""Issue 29 item 6: runtime position-embedding resampling like the official DINO/DINOv2 code, cls_token init, and
a BatchNorm teacher keeping its own buffers under the EMA (against the official formulas, written out here)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgenet_ssl.backbones import build_backbone
from surgenet_ssl.dino.head import DINOHead
from surgenet_ssl.dino.multicrop import MultiCropWrapper

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}


def official_interpolate_pos_encoding(pos_embed: torch.Tensor, w0: int, h0: int) -> torch.Tensor:
    """A copy of DINOv2's interpolate_pos_encoding (interpolate_offset 0.1, interpolate_antialias False)."""
    class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
    dim, n = pos_embed.shape[-1], patch_pos_embed.shape[1]
    m = int(math.sqrt(n))
    sx, sy = float(w0 + 0.1) / m, float(h0 + 0.1) / m
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, m, m, dim).permute(0, 3, 1, 2),
        scale_factor=(sx, sy),
        mode="bicubic",
        antialias=False,
    )
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


@pytest.mark.parametrize("crop", [32, 48, 96])
def test_official_runtime_resampling_of_local_crops_equals_the_official_formula(crop):
    torch.manual_seed(0)
    official = build_backbone("vit_small", img_size=64, pos_embed_resampling="official", **TINY).eval()
    timm_way = build_backbone("vit_small", img_size=64, **TINY).eval()
    timm_way.load_state_dict(official.state_dict())
    x = torch.randn(2, 3, crop, crop)
    patches = official.patch_embed(x)  # NHWC (dynamic_img_size)
    grid = crop // 16
    want = torch.cat([official.cls_token.expand(2, -1, -1), patches.reshape(2, grid * grid, -1)], dim=1)
    want = want + official_interpolate_pos_encoding(official.pos_embed.detach(), grid, grid)
    assert torch.allclose(official._pos_embed(patches), want, atol=1e-6)
    if crop < 64:  # shrinking: timm's antialiased resampling differs from the official one
        assert not torch.allclose(timm_way._pos_embed(patches), want, atol=1e-4)
    y = torch.randn(2, 3, 64, 64)  # the model's own grid: no resampling, the same as timm
    assert torch.equal(official(y), timm_way(y))


def test_official_resampling_with_registers_adds_no_position_to_the_prefix_tokens():
    model = build_backbone("dinov2_vits14_reg4", img_size=56, pos_embed_resampling="official", **TINY).eval()
    patches = model.patch_embed(torch.randn(1, 3, 28, 28))
    out = model._pos_embed(patches)
    assert out.shape == (1, 1 + 4 + 4, 32)
    assert torch.equal(out[:, 0], model.cls_token[:, 0].detach()) and torch.equal(out[:, 1:5], model.reg_token.detach())
    with pytest.raises(ValueError, match="pos_embed_resampling"):
        build_backbone("vit_small", pos_embed_resampling="antialias", **TINY)


def test_cls_token_init_like_the_official_vits():
    torch.manual_seed(0)
    v1 = build_backbone("vit_small", img_size=64, depth=1, embed_dim=4096, num_heads=8)
    assert 0.018 < float(v1.cls_token.std()) < 0.022  # official DINO: trunc_normal_(std=.02) (cut at +-2, absolute)
    v2 = build_backbone("dinov2_vits14", img_size=56, **TINY)
    assert float(v2.cls_token.std()) < 1e-5  # official DINOv2: normal_(std=1e-6)


def test_bn_head_teacher_keeps_its_running_statistics_through_a_training_step():
    from surgenet_ssl.dino.ema import update_teacher

    torch.manual_seed(0)
    student = MultiCropWrapper(nn.Sequential(nn.Flatten(), nn.Linear(12, 8)), DINOHead(8, 16, use_bn=True))
    teacher = MultiCropWrapper(nn.Sequential(nn.Flatten(), nn.Linear(12, 8)), DINOHead(8, 16, use_bn=True))
    teacher.load_state_dict(student.state_dict())
    student(torch.randn(6, 3, 2, 2) * 5 + 3)  # the student's BN statistics move
    with torch.no_grad():
        teacher(torch.randn(6, 3, 2, 2))  # the teacher's own forward moves its own
    own = {k: v.clone() for k, v in teacher.named_buffers()}
    update_teacher(student, teacher, 0.9)
    assert own and all(torch.equal(v, dict(teacher.named_buffers())[k]) for k, v in own.items())
    assert any(not torch.equal(v, dict(student.named_buffers())[k]) for k, v in own.items())

"""Meta's ViT checkpoints as ``backbone.init_weights`` (issue 29 item 2), with synthetic files in the official key
layouts (no download): DINOv2 ``dinov2_vit*14(_reg4)_pretrain.pth`` (mask_token, register_tokens, pos_embed at
518 px, ls1/ls2 gammas), DINO ``dino_vits16`` and the DINOv2 training checkpoint's ``teacher`` (backbone.*,
dino_head.*, ibot_head.*). Features are checked against a plain-PyTorch copy of the official ViT forward
(dinov2/models/vision_transformer.py), run on the file's own tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from support.tiny_training import tiny_dino
from surgenet_ssl.backbones import build_backbone
from surgenet_ssl.models.weights import load_backbone_weights
from surgenet_ssl.training.init_weights import initialize_dino
from surgenet_ssl.training.module import DINOModule

DIM, HEADS, DEPTH = 384, 6, 12  # ViT-S


def official_layout(patch: int, grid: int, registers: int, layerscale: bool, seed: int = 0) -> dict:
    """A random ViT-S state dict with the official names and shapes (pos_embed for a grid x grid image)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    sd = {
        "cls_token": rnd(1, 1, DIM),
        "pos_embed": rnd(1, 1 + grid * grid, DIM),
        "patch_embed.proj.weight": rnd(DIM, 3, patch, patch),
        "patch_embed.proj.bias": rnd(DIM),
    }
    if registers:
        sd["register_tokens"] = rnd(1, registers, DIM)
    if layerscale:  # DINOv2 backbones carry the iBOT mask token
        sd["mask_token"] = rnd(1, DIM)
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd |= {
            b + "norm1.weight": 1 + rnd(DIM, std=0.1),
            b + "norm1.bias": rnd(DIM),
            b + "attn.qkv.weight": rnd(3 * DIM, DIM),
            b + "attn.qkv.bias": rnd(3 * DIM),
            b + "attn.proj.weight": rnd(DIM, DIM),
            b + "attn.proj.bias": rnd(DIM),
            b + "norm2.weight": 1 + rnd(DIM, std=0.1),
            b + "norm2.bias": rnd(DIM),
            b + "mlp.fc1.weight": rnd(4 * DIM, DIM),
            b + "mlp.fc1.bias": rnd(4 * DIM),
            b + "mlp.fc2.weight": rnd(DIM, 4 * DIM),
            b + "mlp.fc2.bias": rnd(DIM),
        }
        if layerscale:
            sd[b + "ls1.gamma"] = 0.5 + rnd(DIM, std=0.1)
            sd[b + "ls2.gamma"] = 0.5 + rnd(DIM, std=0.1)
    sd["norm.weight"], sd["norm.bias"] = 1 + rnd(DIM, std=0.1), rnd(DIM)
    return sd


def official_forward(sd: dict, x: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLS, patch tokens) after the final norm, as the official DINO / DINOv2 ViT (prepare_tokens_with_masks and
    interpolate_pos_encoding with interpolate_offset 0.1, no antialias)."""
    b, _, h, w = x.shape
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), t], dim=1)
    pos = sd["pos_embed"]
    n = pos.shape[1] - 1
    h0, w0 = h // patch, w // patch
    if n != h0 * w0 or h != w:
        m = int(math.sqrt(n))
        grid = pos[:, 1:].reshape(1, m, m, DIM).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h0 + 0.1) / m, (w0 + 0.1) / m), mode="bicubic", antialias=False)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, DIM)], dim=1)
    t = t + pos
    registers = sd.get("register_tokens")
    if registers is not None:
        t = torch.cat([t[:, :1], registers.expand(b, -1, -1), t[:, 1:]], dim=1)
    for i in range(DEPTH):
        p = f"blocks.{i}."
        y = F.layer_norm(t, (DIM,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        q, k, v = (
            F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
            .reshape(b, -1, 3, HEADS, DIM // HEADS)
            .permute(2, 0, 3, 1, 4)
        )
        a = ((q * (DIM // HEADS) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        y = F.linear(a.transpose(1, 2).reshape(b, -1, DIM), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        t = t + y * sd.get(p + "ls1.gamma", 1.0)
        y = F.layer_norm(t, (DIM,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        y = F.linear(
            F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
            sd[p + "mlp.fc2.weight"],
            sd[p + "mlp.fc2.bias"],
        )
        t = t + y * sd.get(p + "ls2.gamma", 1.0)
    t = F.layer_norm(t, (DIM,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    n_prefix = 1 + (0 if registers is None else registers.shape[1])
    return t[:, 0], t[:, n_prefix:]


def _features(model, x):
    tokens = model.forward_features(x)
    return model.forward_head(tokens, pre_logits=True), tokens[:, model.num_prefix_tokens :]


@pytest.mark.parametrize("name,registers", [("dinov2_vits14_reg4", 4), ("dinov2_vits14", 0)])
@torch.no_grad()
def test_official_dinov2_pretrain_file_gives_the_official_features(tmp_path, name, registers):
    sd = official_layout(patch=14, grid=37, registers=registers, layerscale=True)  # pos_embed at 518 px
    path = tmp_path / f"dinov2_vits14{'_reg4' if registers else ''}_pretrain.pth"
    torch.save(sd, path)
    model = build_backbone(name, img_size=224).eval()  # as training builds it: at the global crop size
    report = load_backbone_weights(model, path, name)
    assert report.loaded == len(model.state_dict()) and not report.missing and not report.unexpected
    assert "official DINOv2" in report.format and report.resampled == "pos_embed 37x37 -> 16x16"
    assert torch.equal(report.mask_token, sd["mask_token"])
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    cls, patches = _features(model, x)
    ref_cls, ref_patches = official_forward(sd, x, patch=14)
    torch.testing.assert_close(cls, ref_cls, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(patches, ref_patches, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_dino_v1_vits16_file_gives_the_official_features(tmp_path):
    sd = official_layout(patch=16, grid=14, registers=0, layerscale=False)  # dino_deitsmall16_pretrain.pth
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(sd, path)
    model = build_backbone("vit_small", img_size=224).eval()
    report = load_backbone_weights(model, path, "vit_small")
    assert report.loaded == len(sd) and report.format.endswith("timm naming") and not report.resampled
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_features(model, x)[0], official_forward(sd, x, patch=16)[0], atol=2e-5, rtol=1e-4)


def _head_layout(prefix: str, out_dim: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    shapes = {"mlp.0.weight": (16, DIM), "mlp.0.bias": (16,), "mlp.2.weight": (16, 16), "mlp.2.bias": (16,)}
    shapes |= {"mlp.4.weight": (8, 16), "mlp.4.bias": (8,), "last_layer.weight_g": (out_dim, 1)}
    shapes |= {"last_layer.weight_v": (out_dim, 8)}
    return {f"{prefix}{k}": torch.randn(*s, generator=g) for k, s in shapes.items()}


@torch.no_grad()
def test_dinov2_training_teacher_checkpoint_starts_student_teacher_head_and_mask_token(tmp_path):
    backbone = {f"backbone.{k}": v for k, v in official_layout(14, 37, 4, True).items()}
    # an FSDP-chunked layout (block_chunks=4: blocks.<chunk>.<i>.) as the training checkpoints write it
    chunked = {k.replace("backbone.blocks.", "backbone.blocks.CHUNK."): v for k, v in backbone.items()}
    chunked = {k.replace("CHUNK", str(int(k.split(".")[3]) // 3)) if "CHUNK" in k else k: v for k, v in chunked.items()}
    teacher = chunked | _head_layout("dino_head.", 32, 3) | _head_layout("ibot_head.", 24, 4)
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": teacher}, path)
    cfg = tiny_dino()
    cfg["head"] = {**cfg["head"], "norm_last_layer": False}
    cfg["crops"] = {**cfg["crops"], "global_size": 56, "local_size": 28}
    cfg["loss"] = {**cfg["loss"], "ibot_weight": 1.0}
    backbone_cfg = {"name": "dinov2_vits14_reg4", "drop_path_rate": 0.0}
    module = DINOModule(backbone_cfg, cfg, batch_size=2, diagnostics_every_n_steps=0)
    report = initialize_dino(module.student, module.teacher, path, "dinov2_vits14_reg4")
    text = str(report)
    assert "pos_embed 37x37 -> 4x4" in text and "mask_token loaded" in text and report.head_tensors == 8
    for wrapper in (module.student, module.teacher):
        assert torch.equal(wrapper.mask_token, backbone["backbone.mask_token"])
        assert torch.equal(wrapper.head.last_layer.weight_v, teacher["dino_head.last_layer.weight_v"])
        assert torch.equal(wrapper.backbone.reg_token, backbone["backbone.register_tokens"])
        assert torch.equal(wrapper.backbone.blocks[11].ls2.gamma, backbone["backbone.blocks.11.ls2.gamma"])
    # no registers -> the CLS position stays in pos_embed; with registers it is folded into cls_token
    expected_cls = backbone["backbone.cls_token"] + backbone["backbone.pos_embed"][:, :1]
    assert torch.equal(module.student.backbone.cls_token, expected_cls)


def test_official_file_of_another_size_is_an_error_naming_the_tensors(tmp_path):
    sd = official_layout(14, 37, 4, True)
    torch.save(sd, tmp_path / "vits.pth")
    with pytest.raises(ValueError, match="wrong shape|does not match"):
        load_backbone_weights(
            build_backbone("dinov2_vitb14_reg4", img_size=56), tmp_path / "vits.pth", "dinov2_vitb14_reg4"
        )
    with pytest.raises(ValueError, match="pos_embed"):  # a file with registers into a model without: never silent
        load_backbone_weights(build_backbone("dinov2_vits14", img_size=56), tmp_path / "vits.pth", "dinov2_vits14")

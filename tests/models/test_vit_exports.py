"""Issue 29 item 8: a ViT teacher exported by the run (timm naming) loads strictly into timm's model and into the
downstream classification and FPN models, its position table resampled to the downstream image size."""

from __future__ import annotations

import timm
import torch
from safetensors.torch import load_file

from surgenet_ssl.backbones import build_backbone
from surgenet_ssl.backbones.vit import resample_pos_embed
from surgenet_ssl.models import BackboneFPN, build_classifier
from surgenet_ssl.training.teacher_export import export_checkpoint

TINY = {"depth": 4, "embed_dim": 64, "num_heads": 2}  # a tiny vit_small (patch 16), built at 64 px like a run


def _export(tmp_path):
    torch.manual_seed(0)
    teacher = build_backbone("vit_small", img_size=64, **TINY)
    state = {f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}
    state.update({f"student.backbone.{k}": v for k, v in teacher.state_dict().items()})
    state["dino_loss.center"] = torch.zeros(1, 8)
    checkpoint = {"state_dict": state, "hyper_parameters": {"backbone": {"name": "vit_small", **TINY}}, "epoch": 0}
    return teacher, export_checkpoint(checkpoint, tmp_path, dataset="x")


def test_vit_export_loads_strictly_into_timm_and_the_downstream_models_at_another_size(tmp_path):
    teacher, paths = _export(tmp_path)
    exported = load_file(str(paths["teacher_safetensors"]))
    plain = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=64, **TINY)
    plain.load_state_dict(exported, strict=True)  # timm naming, nothing missing or unexpected
    x = torch.randn(2, 3, 64, 64)
    teacher.eval(), plain.eval()
    assert torch.allclose(plain(x), teacher(x), atol=1e-6)

    # classification at 96 px: the 4x4 position table resampled to 6x6 with the official formula
    for source in (paths["teacher_safetensors"], paths["teacher_pth"]):
        clf = build_classifier("vit_small", num_classes=3, pretrained_weights=str(source), img_size=96, **TINY)
        want = resample_pos_embed(teacher.pos_embed.detach(), (6, 6), 1)
        assert torch.equal(clf.pos_embed.detach(), want) and "4x4 -> 6x6" in str(clf.load_report)
        assert clf.eval()(torch.randn(2, 3, 96, 96)).shape == (2, 3)
        blocks = clf.state_dict()
        assert all(torch.equal(blocks[k], v) for k, v in exported.items() if k != "pos_embed")

    # FPN on patch tokens of four depths, at 128 px (8x8 patches)
    fpn = BackboneFPN("vit_small", num_classes=5, pretrained_weights=str(paths["teacher_pth"]), img_size=128, **TINY)
    assert "4x4 -> 8x8" in str(fpn.load_report)
    features = fpn.eval().forward_features_list(torch.randn(1, 3, 128, 128))
    assert [tuple(f.shape[-3:]) for f in features] == [(64, 32, 32), (64, 16, 16), (64, 8, 8), (64, 4, 4)]
    assert fpn(torch.randn(1, 3, 128, 128)).shape == (1, 5, 128, 128)
    vit = fpn.encoder.vit
    assert fpn.encoder.indices == [0, 1, 2, 3]
    # the deepest level is the final-normed last block, the tokens of the plain forward
    tokens = vit.forward_features(torch.ones(1, 3, 128, 128))[:, 1:]
    deepest = vit.forward_intermediates(torch.ones(1, 3, 128, 128), indices=[3], norm=True, intermediates_only=True)
    assert torch.allclose(deepest[0].flatten(2).transpose(1, 2), tokens, atol=1e-5)


def test_vit_pyramid_picks_four_evenly_spaced_blocks_of_a_deep_vit():
    from surgenet_ssl.models import ViTPyramid

    vit = build_backbone("vit_small", img_size=64, depth=12, embed_dim=64, num_heads=2)
    assert ViTPyramid(vit).indices == [2, 5, 8, 11]

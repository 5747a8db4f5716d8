"""build_backbone: names, SurgeNet CaFormer variant, drop-path, dynamic ViT input size, clear errors."""

import pytest
import torch
from timm.layers import DropPath
from timm.models.metaformer import StarReLU

from surgenet_ssl.backbones import BACKBONES, backbone_num_features, build_backbone

torch.set_num_threads(1)

# Pooled feature widths of the published architectures (SURGENET.md section 6 / timm).
NUM_FEATURES = {"caformer_s18": 512, "convnextv2_tiny": 768, "pvt_v2_b2": 512, "vit_small": 384}


VITS = (
    "vit_small",
    "vit_base",
    "vit_large",
    "dinov2_vits14",
    "dinov2_vitb14",
    "dinov2_vitl14",
    "dinov2_vits14_reg4",
    "dinov2_vitb14_reg4",
    "dinov2_vitl14_reg4",
    "dinov3_vits16",
    "dinov3_vitb16",
    "dinov3_vitl16",
)


def test_backbone_names_are_the_documented_choices():
    assert BACKBONES == ("caformer_s18", "convnextv2_tiny", "pvt_v2_b2", *VITS, "timm")


@pytest.mark.parametrize(
    "name,patch,prefix", [("dinov2_vits14", 14, 1), ("dinov2_vits14_reg4", 14, 5), ("dinov3_vits16", 16, 5)]
)
def test_vits_take_global_and_local_crops_of_any_size(name, patch, prefix):
    # built at the global crop size like training; other sizes (a DINOv2 112-px local crop, a non-square one) run
    model = build_backbone(name, img_size=4 * patch).eval()
    assert model.num_prefix_tokens == prefix
    with torch.no_grad():
        for h, w in ((4 * patch, 4 * patch), (8 * patch, 8 * patch), (2 * patch, 3 * patch)):
            assert model(torch.randn(1, 3, h, w)).shape == (1, 384)
            assert model.forward_features(torch.randn(1, 3, h, w)).shape[1] == prefix + (h // patch) * (w // patch)


def test_unknown_backbone_lists_valid_choices():
    with pytest.raises(ValueError) as err:
        build_backbone("resnet9000")
    msg = str(err.value)
    assert "Unknown backbone 'resnet9000'" in msg
    for name in BACKBONES:
        assert name in msg


@pytest.mark.parametrize("name", ["caformer_s18", "convnextv2_tiny", "pvt_v2_b2", "vit_small"])
def test_forward_returns_pooled_features(name):
    model = build_backbone(name).eval()
    assert backbone_num_features(model) == NUM_FEATURES[name]
    size = 64 if name != "vit_small" else 96
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, NUM_FEATURES[name])


def test_vit_small_accepts_local_and_global_crop_sizes():
    model = build_backbone("vit_small").eval()
    with torch.no_grad():
        for size in (96, 224):
            assert model(torch.randn(1, 3, size, size)).shape == (1, 384)


def test_surgenet_caformer_uses_relu_not_starrelu():
    model = build_backbone("caformer_s18")
    mods = list(model.modules())
    assert not any(isinstance(m, StarReLU) for m in mods)
    # 6 SepConv token mixers (stages 1-2) + 18 MLPs (all blocks) = 24 ReLUs
    assert sum(isinstance(m, torch.nn.ReLU) for m in mods) == 24
    assert all(isinstance(b.token_mixer.act1, torch.nn.ReLU) for b in model.stages[0].blocks)
    sd = model.state_dict()
    assert len(sd) == 152
    assert not any(k.endswith(("act1.scale", "act1.bias", "act.scale", "act.bias")) for k in sd)


def test_imagenet_caformer_is_timms_stock_starrelu_model():
    model = build_backbone("caformer_s18", pretrained_variant="ImageNet")
    assert any(isinstance(m, StarReLU) for m in model.modules())
    assert len(model.state_dict()) == 152 + 48  # StarReLU scale + bias in 24 activations


def test_invalid_pretrained_variant():
    with pytest.raises(ValueError, match="SurgeNet, ImageNet"):
        build_backbone("caformer_s18", pretrained_variant="imagenet21k")


@pytest.mark.parametrize("name", ["caformer_s18", "convnextv2_tiny", "pvt_v2_b2", "vit_small"])
def test_drop_path_rate_reaches_model(name):
    rates = [m.drop_prob for m in build_backbone(name, drop_path_rate=0.1).modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.1)
    assert not any(isinstance(m, DropPath) for m in build_backbone(name, drop_path_rate=0.0).modules())


def test_timm_backbone_by_name():
    model = build_backbone("timm", timm_name="resnet18").eval()
    assert backbone_num_features(model) == 512
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 512)


def test_timm_backbone_needs_a_known_name():
    with pytest.raises(ValueError, match="needs timm_name"):
        build_backbone("timm")
    with pytest.raises(ValueError, match="resnet50") as err:
        build_backbone("timm", timm_name="resnet5O")  # letter O: close to resnet50
    assert "not a timm model" in str(err.value)


def test_never_downloads_weights():
    with pytest.raises(ValueError, match="never downloads"):
        build_backbone("convnextv2_tiny", pretrained=True)


def test_timm_kwargs_pass_through_num_classes():
    model = build_backbone("pvt_v2_b2", num_classes=12).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 12)


def test_surgenet_caformer_features_only_gives_four_stages():
    model = build_backbone("caformer_s18", features_only=True).eval()
    assert model.feature_info.channels() == [64, 128, 320, 512]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert backbone_num_features(model) == 512
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert not any(isinstance(m, StarReLU) for m in model.modules())

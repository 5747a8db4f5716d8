"""Downstream models: the published "Loading Models" snippet with our import line, FPN shapes, features."""

import pytest
import torch
from torch import nn

from surgenet_ssl.backbones import build_backbone, timm_to_surgenet
from surgenet_ssl.models import PVTV2FPN, ConvNextFPN, MetaFormerFPN, caformer_s18, convnextv2_tiny, pvt_v2_b2


def test_published_loading_snippet_runs_with_our_import_line(published_files):
    """SURGENET.md section 3, verbatim except the import lines and local file:// URLs for the weights."""
    from surgenet_ssl.models import caformer_s18, MetaFormerFPN  # noqa: F811, I001
    from surgenet_ssl.models import convnextv2_tiny, ConvNextFPN  # noqa: F811
    from surgenet_ssl.models import pvt_v2_b2, PVTV2FPN  # noqa: F811

    urls = {
        "SurgeNetXL": published_files["caformer_s18"].resolve().as_uri(),
        "SurgeNet-ConvNextv2": published_files["convnextv2_tiny"].resolve().as_uri(),
        "SurgeNet-PVTv2": published_files["pvt_v2_b2"].resolve().as_uri(),
    }
    x = torch.randn(1, 3, 64, 64)
    results = []

    # CAFormer model
    classification_model = caformer_s18(num_classes=12, pretrained="SurgeNet", pretrained_weights=urls["SurgeNetXL"])
    segmentation_model = MetaFormerFPN(num_classes=12, pretrained="SurgeNet", pretrained_weights=urls["SurgeNetXL"])
    results.append((classification_model, segmentation_model, 152))

    # ConvNextv2 model
    classification_model = convnextv2_tiny(num_classes=12, pretrained_weights=urls["SurgeNet-ConvNextv2"])
    segmentation_model = ConvNextFPN(num_classes=12, pretrained_weights=urls["SurgeNet-ConvNextv2"])
    results.append((classification_model, segmentation_model, 198))

    # PVTv2 model
    classification_model = pvt_v2_b2(num_classes=12, pretrained_weights=urls["SurgeNet-PVTv2"])
    segmentation_model = PVTV2FPN(num_classes=12, pretrained_weights=urls["SurgeNet-PVTv2"])
    results.append((classification_model, segmentation_model, 332))

    with torch.no_grad():
        for cls_model, seg_model, n_tensors in results:
            assert cls_model.load_report.loaded == n_tensors and seg_model.load_report.loaded == n_tensors
            logits = cls_model.eval()(x)
            masks = seg_model.eval()(x)
            assert logits.shape == (1, 12) and masks.shape == (1, 12, 64, 64)
            assert torch.isfinite(logits).all() and torch.isfinite(masks).all()
    published = torch.load(published_files["caformer_s18"], weights_only=True)
    assert torch.equal(results[0][0].stem.conv.weight, published["downsample_layers.0.conv.weight"])


@pytest.mark.parametrize(
    "fpn_cls, backbone, channels",
    [
        (MetaFormerFPN, "caformer_s18", [64, 128, 320, 512]),
        (ConvNextFPN, "convnextv2_tiny", [96, 192, 384, 768]),
        (PVTV2FPN, "pvt_v2_b2", [64, 128, 320, 512]),
    ],
)
def test_fpn_output_shape_and_stage_features(tmp_path, fpn_cls, backbone, channels):
    torch.manual_seed(0)
    source = build_backbone(backbone).eval()
    path = tmp_path / "teacher.pth"
    torch.save(timm_to_surgenet(source.state_dict(), backbone), path)
    model = fpn_cls(num_classes=5, pretrained_weights=str(path)).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert model(x).shape == (2, 5, 64, 96)
        feats = model.forward_features_list(x)
        _, expected = source.forward_intermediates(x)
    assert [f.shape[1] for f in feats] == channels
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]  # strides 4..32
    for f, e in zip(feats, expected, strict=True):
        assert torch.equal(f, e)  # the encoder carries the loaded weights


def test_fpn_decoder_layout():
    model = PVTV2FPN(num_classes=7)
    dec = model.decoder
    assert [m.out_channels for m in dec.lateral] == [256] * 4 and [m.kernel_size for m in dec.lateral] == [(1, 1)] * 4
    groupnorms = [m for m in dec.modules() if isinstance(m, nn.GroupNorm)]
    assert groupnorms and all(g.num_groups == 32 and g.num_channels == 128 for g in groupnorms)
    assert len(groupnorms) == 1 + 1 + 2 + 3  # levels at strides 4, 8, 16, 32 need 0, 1, 2, 3 upsamplings
    assert (dec.classifier.in_channels, dec.classifier.out_channels, dec.classifier.kernel_size) == (512, 7, (3, 3))
    assert model.load_report is None  # no weights requested: random init, nothing loaded


def test_fpn_rejects_input_not_divisible_by_32():
    model = ConvNextFPN(num_classes=2).eval()
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.randn(1, 3, 70, 64))


@pytest.mark.parametrize(
    "builder, backbone, width",
    [(caformer_s18, "caformer_s18", 512), (convnextv2_tiny, "convnextv2_tiny", 768), (pvt_v2_b2, "pvt_v2_b2", 512)],
)
def test_num_classes_zero_returns_pooled_normalized_features(published_files, builder, backbone, width):
    model = builder(num_classes=0, pretrained_weights=published_files[backbone]).eval()
    reference = build_backbone(backbone).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model(x)
        assert feats.shape == (2, width)
        assert torch.equal(feats, reference(x))
        # normalized: the final norm (LayerNorm) is applied to the pooled vector (timm convention)
        pooled = reference.forward_head(reference.forward_features(x), pre_logits=True)
        assert torch.equal(feats, pooled)


def test_caformer_variant_is_inferred_from_weights_and_validated(tmp_path):
    imagenet = build_backbone("caformer_s18", pretrained_variant="ImageNet")
    path = tmp_path / "caformer_s18_imagenet.pth"
    torch.save({"model": timm_to_surgenet(imagenet.state_dict(), "caformer_s18")}, path)
    model = caformer_s18(num_classes=3, pretrained_weights=path)  # pretrained=None: infer -> ImageNet (StarReLU)
    assert model.load_report.loaded == 200
    with pytest.raises(ValueError, match="pretrained='ImageNet'"):
        caformer_s18(num_classes=3, pretrained="SurgeNet", pretrained_weights=path)
    with pytest.raises(ValueError, match="Valid choices: SurgeNet, ImageNet"):
        caformer_s18(pretrained="imagenet")


def test_every_model_accepts_the_caformer_call_form(published_files):
    """Changing only the import line of the CaFormer snippet must work for the other backbones too."""
    from surgenet_ssl.models import PVTV2FPN, ConvNextFPN, convnextv2_tiny, pvt_v2_b2

    for build, key in (
        (convnextv2_tiny, "convnextv2_tiny"),
        (pvt_v2_b2, "pvt_v2_b2"),
        (ConvNextFPN, "convnextv2_tiny"),
        (PVTV2FPN, "pvt_v2_b2"),
    ):
        model = build(num_classes=12, pretrained="SurgeNet", pretrained_weights=str(published_files[key]))
        assert model.load_report.loaded > 100 and not model.load_report.missing

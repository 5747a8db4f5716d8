"""SurgeNet <-> timm naming, checked against the published key files (tests/backbones/surgenet_keys/*.txt)."""

import pytest
import torch

from backbones.surgenet_keyfile import surgenet_keys
from surgenet_ssl.backbones import (
    build_backbone,
    detect_naming,
    surgenet_to_timm,
    timm_to_surgenet,
)

torch.set_num_threads(1)

CONVERTIBLE = ["caformer_s18", "convnextv2_tiny", "pvt_v2_b2"]
PUBLISHED_TENSOR_COUNT = {"caformer_s18": 152, "convnextv2_tiny": 198, "pvt_v2_b2": 332}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: build_backbone(name).eval() for name in CONVERTIBLE}


def random_published_file(backbone: str, with_head: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """A stand-in for a published teacher file: exactly the key file's names/shapes, random values."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, shape in surgenet_keys(backbone, with_head).items()}


@pytest.mark.parametrize("backbone", CONVERTIBLE)
def test_timm_to_surgenet_gives_exactly_the_published_names_and_shapes(models, backbone):
    converted = timm_to_surgenet(models[backbone].state_dict(), backbone)
    published = surgenet_keys(backbone)
    assert len(published) == PUBLISHED_TENSOR_COUNT[backbone]
    assert {k: tuple(v.shape) for k, v in converted.items()} == published
    assert list(converted) == list(published)  # same order as a published file, too
    assert all(v.device.type == "cpu" for v in converted.values())


def test_caformer_value_count_matches_published(models):
    converted = timm_to_surgenet(models["caformer_s18"].state_dict(), "caformer_s18")
    assert sum(v.numel() for v in converted.values()) == 23_237_888


@pytest.mark.parametrize("backbone", CONVERTIBLE)
def test_round_trip_surgenet_timm_surgenet_is_identity(backbone):
    published = random_published_file(backbone)
    back = timm_to_surgenet(surgenet_to_timm(published, backbone), backbone)
    assert list(back) == list(published)
    for k, v in published.items():
        assert back[k].shape == v.shape and torch.equal(back[k], v), k


@pytest.mark.parametrize("backbone", CONVERTIBLE)
def test_round_trip_timm_surgenet_timm_is_identity(models, backbone):
    sd = models[backbone].state_dict()
    back = surgenet_to_timm(timm_to_surgenet(sd, backbone), backbone)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].shape == v.shape and torch.equal(back[k], v), k


@pytest.mark.parametrize("backbone", CONVERTIBLE)
def test_converted_weights_give_identical_features(models, backbone):
    original = models[backbone]
    torch.manual_seed(1)
    fresh = build_backbone(backbone).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = original(x)
        assert not torch.allclose(fresh(x), expected)  # differently initialised: the test can fail
        fresh.load_state_dict(surgenet_to_timm(timm_to_surgenet(original.state_dict(), backbone), backbone))
        assert torch.equal(fresh(x), expected)


@pytest.mark.parametrize("backbone", CONVERTIBLE)
def test_published_file_with_head_loads_strictly_into_timm_model(backbone):
    published = random_published_file(backbone, with_head=True)
    converted = surgenet_to_timm(published, backbone)
    assert not any(k.startswith("head.") and not k.startswith("head.norm.") for k in converted)  # classifier dropped
    build_backbone(backbone).load_state_dict(converted, strict=True)


def test_caformer_linear_weights_become_1x1_convs_and_back():
    published = random_published_file("caformer_s18")
    timm_sd = surgenet_to_timm(published, "caformer_s18")
    w = published["stages.0.0.token_mixer.pwconv1.weight"]
    assert w.shape == (128, 64)
    assert torch.equal(timm_sd["stages.0.blocks.0.token_mixer.pwconv1.weight"], w.reshape(128, 64, 1, 1))
    assert torch.equal(timm_sd["stages.1.blocks.2.mlp.fc2.weight"][:, :, 0, 0], published["stages.1.2.mlp.fc2.weight"])
    # stages 3-4 stay linear; stem/downsampling/final norm move
    assert timm_sd["stages.2.blocks.0.mlp.fc1.weight"].shape == (1280, 320)
    assert torch.equal(timm_sd["stem.norm.weight"], published["downsample_layers.0.post_norm.weight"])
    assert torch.equal(timm_sd["stages.3.downsample.norm.weight"], published["downsample_layers.3.pre_norm.weight"])
    assert torch.equal(timm_sd["head.norm.bias"], published["norm.bias"])


def test_convnext_grn_and_pvt_stage_numbering():
    cn = random_published_file("convnextv2_tiny")
    cn_timm = surgenet_to_timm(cn, "convnextv2_tiny")
    assert torch.equal(cn_timm["stages.3.blocks.2.mlp.grn.weight"], cn["stages.3.2.grn.gamma"].flatten())
    assert torch.equal(cn_timm["stem.1.bias"], cn["downsample_layers.0.1.bias"])
    assert torch.equal(cn_timm["stages.2.downsample.1.weight"], cn["downsample_layers.2.1.weight"])
    pvt = random_published_file("pvt_v2_b2")
    pvt_timm = surgenet_to_timm(pvt, "pvt_v2_b2")
    assert torch.equal(pvt_timm["stages.3.downsample.proj.weight"], pvt["patch_embed4.proj.weight"])
    assert torch.equal(pvt_timm["stages.0.blocks.1.mlp.dwconv.weight"], pvt["block1.1.mlp.dwconv.dwconv.weight"])
    assert torch.equal(pvt_timm["stages.2.norm.weight"], pvt["norm3.weight"])


@pytest.mark.parametrize("backbone", CONVERTIBLE)
def test_detect_naming(models, backbone):
    sd = models[backbone].state_dict()
    assert detect_naming(sd, backbone) == "timm"
    assert detect_naming(random_published_file(backbone, with_head=True), backbone) == "surgenet"


def test_detect_naming_rejects_other_backbone_and_prefixed_dicts():
    with pytest.raises(ValueError, match="neither SurgeNet- nor timm-named caformer_s18"):
        detect_naming(random_published_file("convnextv2_tiny"), "caformer_s18")
    prefixed = {f"backbone.{k}": v for k, v in random_published_file("pvt_v2_b2").items()}
    with pytest.raises(ValueError, match="prefixes"):
        detect_naming(prefixed, "pvt_v2_b2")
    with pytest.raises(ValueError, match="no pvt_v2_b2 backbone tensors"):
        detect_naming({"head.weight": torch.zeros(2, 2)}, "pvt_v2_b2")


def test_convert_rejects_foreign_tensors_and_unknown_backbones():
    with pytest.raises(ValueError, match="cannot be converted"):
        surgenet_to_timm(random_published_file("convnextv2_tiny"), "pvt_v2_b2")
    with pytest.raises(ValueError) as err:
        timm_to_surgenet({}, "vit_small")
    for name in CONVERTIBLE:
        assert name in str(err.value)

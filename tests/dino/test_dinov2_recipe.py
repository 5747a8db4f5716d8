"""DINOv2's training recipe (issue 29): the ``dino=dinov2`` values against copies of the official numbers, and each
training feature on a tiny ViT against the official formulas (layer-wise lr decay and the patch-embedding lr
multiplier, the sqrt lr rule, clipping per module, the last layer frozen by lr 0, uniform drop path, the separate
iBOT head). Official source: facebookresearch/dinov2 (configs/ssl_default_config.yaml, utils/param_groups.py,
train/train.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import surgenet_ssl.config.resolvers  # noqa: F401 - registers the config resolvers
from support.tiny_training import crop_batches, quiet_trainer, tiny_dino
from surgenet_ssl.backbones import build_backbone
from surgenet_ssl.config.dirs import CONFIG_DIR
from surgenet_ssl.dino import DINOHead, MultiCropWrapper, clip_gradients_per_module, param_groups
from surgenet_ssl.dino.recipe import DinoRecipe
from surgenet_ssl.dino.schedules import scaled_lr
from surgenet_ssl.training.module import DINOModule

TINY_VIT = {"name": "timm", "timm_name": "test_vit", "drop_path_rate": 0.0, "dynamic_img_size": True}


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=["dataset=cholec", *overrides])


# ------------------------------------------------------------------------------------------- the recipe's values
# A copy of the official numbers (dinov2/configs/ssl_default_config.yaml at b8931f7), not read from our files.
OFFICIAL_DEFAULT = {
    "out_dim": 65536,  # dino.head_n_prototypes
    "head.hidden_dim": 2048,
    "head.bottleneck_dim": 256,
    "head.nlayers": 3,
    "loss.koleo_weight": 0.1,  # dino.koleo_loss_weight
    "loss.ibot_weight": 1.0,  # ibot.loss_weight
    "loss.ibot_mask_probability": 0.5,
    "loss.ibot_mask_ratio": (0.1, 0.5),
    "ibot_head.separate": False,
    "ibot_head.out_dim": 65536,
    "teacher.momentum": 0.992,  # teacher.momentum_teacher
    "teacher.momentum_end": 1.0,
    "loss.warmup_teacher_temp": 0.04,
    "loss.teacher_temp": 0.07,
    "loss.warmup_teacher_temp_epochs": 30.0,
    "optimizer.weight_decay": 0.04,
    "optimizer.weight_decay_end": 0.4,
    "optimizer.base_lr": 0.004,
    "optimizer.reference_batch": 1024,  # scaling_rule: sqrt_wrt_1024
    "optimizer.lr_scaling": "sqrt",
    "optimizer.warmup_epochs": 10.0,
    "optimizer.min_lr": 1.0e-06,
    "optimizer.clip_grad": 3.0,
    "optimizer.freeze_last_layer": 1,
    "optimizer.patch_embed_lr_mult": 0.2,
    "optimizer.layerwise_decay": 0.9,
    "optimizer.betas": (0.9, 0.999),
    "crops.global_scale": (0.32, 1.0),
    "crops.local_number": 8,
    "crops.local_scale": (0.05, 0.32),
    "crops.global_size": 224,
    "crops.local_size": 96,
}


def _get(recipe: DinoRecipe, dotted: str):
    value = recipe
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def test_dinov2_recipe_is_the_official_default_config():
    cfg = _compose("dino=dinov2", "backbone=dinov2_vitb14_reg4")
    recipe = DinoRecipe.from_dict(OmegaConf.to_container(cfg.dino, resolve=True))
    for key, official in OFFICIAL_DEFAULT.items():
        assert _get(recipe, key) == official, key
    # the official training code's behaviour, as recipe switches
    assert recipe.optimizer.clip_mode == "per_module" and recipe.optimizer.freeze_last_layer_mode == "zero_lr"
    assert recipe.head.norm_last_layer is False  # DINOv2's DINOHead: weight_norm, weight_g filled with 1, trainable
    # student.drop_path_rate 0.3, student.drop_path_uniform true
    assert cfg.backbone.drop_path_rate == 0.3 and cfg.backbone.drop_path_uniform is True
    assert _compose("dino=dinov2", "backbone.drop_path_rate=0.4").backbone.drop_path_rate == 0.4  # L/g: 0.4


def test_dinov2_continue_and_dinov1_vit_presets():
    cfg = _compose("dino=dinov2_continue", "backbone=dinov2_vitb14_reg4")
    r = DinoRecipe.from_dict(OmegaConf.to_container(cfg.dino, resolve=True))
    assert (r.crops.global_size, r.crops.global_scale, r.crops.local_scale) == (336, (0.45, 1.0), (0.25, 0.45))
    assert r.crops.global_size % 14 == 0 and r.crops.local_size % 14 == 0
    assert cfg.backbone.freeze_epochs == 1 and r.optimizer.backbone_lr_mult < 1
    assert r.optimizer.layerwise_decay == 0.9 and r.teacher.momentum == 0.992  # the rest is dino=dinov2
    v1 = DinoRecipe.from_dict(OmegaConf.to_container(_compose("dino=dinov1_vit").dino, resolve=True))
    # facebookresearch/dino README: --teacher_temp 0.07 --warmup_teacher_temp_epochs 30 --norm_last_layer false
    assert (v1.loss.teacher_temp, v1.loss.warmup_teacher_temp_epochs, v1.head.norm_last_layer) == (0.07, 30, False)
    assert v1.optimizer.lr_scaling == "linear" and v1.optimizer.base_lr == 5e-4 and v1.teacher.momentum == 0.996


def test_default_recipe_keeps_dino_v1_behaviour():
    r = DinoRecipe.from_dict(OmegaConf.to_container(_compose().dino, resolve=True))
    o = r.optimizer
    assert (o.lr_scaling, o.layerwise_decay, o.patch_embed_lr_mult, o.backbone_lr_mult) == ("linear", 1, 1, 1)
    assert (o.clip_mode, o.freeze_last_layer_mode, r.ibot_head.separate) == ("per_parameter", "drop_gradient", False)


def test_sqrt_lr_rule_hand_computed():
    # dinov2/utils/config.py: lr = base_lr * sqrt(batch_size_per_gpu * world_size / 1024)
    assert scaled_lr(0.004, 2048, 1024, "sqrt") == pytest.approx(0.004 * 1.4142135623730951)
    assert scaled_lr(0.004, 256, 1024, "sqrt") == pytest.approx(0.002)
    assert scaled_lr(5e-4, 512, 256) == pytest.approx(1e-3)  # DINO's linear rule unchanged


# ------------------------------------------------------------------------------------- layer-wise lr decay
def official_lr_decay_rate(name, lr_decay_rate=1.0, num_layers=12, force_is_backbone=False, chunked_blocks=False):
    """Copy of dinov2/utils/param_groups.py get_vit_lr_decay_rate."""
    layer_id = num_layers + 1
    if name.startswith("backbone") or force_is_backbone:
        if (
            ".pos_embed" in name
            or ".patch_embed" in name
            or ".mask_token" in name
            or ".cls_token" in name
            or ".register_tokens" in name
        ):
            layer_id = 0
        elif force_is_backbone and (
            "pos_embed" in name
            or "patch_embed" in name
            or "mask_token" in name
            or "cls_token" in name
            or "register_tokens" in name
        ):
            layer_id = 0
        elif ".blocks." in name and ".residual." not in name:
            layer_id = int(name[name.find(".blocks.") :].split(".")[2]) + 1
        elif chunked_blocks and "blocks." in name and "residual." not in name:
            layer_id = int(name[name.find("blocks.") :].split(".")[2]) + 1
        elif "blocks." in name and "residual." not in name:
            layer_id = int(name[name.find("blocks.") :].split(".")[1]) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


def _official_multipliers(name: str, p: torch.Tensor, depth: int, decay: float, patch_mult: float):
    """(lr multiplier, wd multiplier) of one of our student parameters by the official get_params_groups_with_decay,
    which runs per submodel: the backbone (mask token included, force_is_backbone) and each head (no blocks)."""
    if name.startswith("backbone.") or name == "mask_token":
        official = name.removeprefix("backbone.").replace("reg_token", "register_tokens")
        lr = official_lr_decay_rate(official, decay, num_layers=depth, force_is_backbone=True)
    else:
        official = name.split(".", 1)[1]
        lr = official_lr_decay_rate(official, decay, num_layers=0)
    if "patch_embed" in official:
        lr *= patch_mult
    wd = 0.0 if (official.endswith(".bias") or "norm" in official or "gamma" in official) else 1.0
    return lr, wd


def _tiny_student(reg_tokens: int = 0) -> MultiCropWrapper:
    backbone = build_backbone("timm", timm_name="test_vit", dynamic_img_size=True, reg_tokens=reg_tokens)
    student = MultiCropWrapper(backbone, DINOHead(64, 32, hidden_dim=16, bottleneck_dim=8, norm_last_layer=False))
    student.mask_token = torch.nn.Parameter(torch.zeros(1, 64))
    return student


def test_layerwise_decay_and_patch_embed_multiplier_equal_the_official_groups():
    student = _tiny_student(reg_tokens=4)
    depth = len(student.backbone.blocks)  # 6
    groups = param_groups(student, layerwise_decay=0.9, patch_embed_lr_mult=0.2, split_last_layer=True)
    ours = {id(p): g for g in groups for p in g["params"]}
    names = dict(student.named_parameters())
    assert len(ours) == len(names)  # every parameter in exactly one group
    for name, p in names.items():
        lr, wd = _official_multipliers(name, p, depth, 0.9, 0.2)
        g = ours[id(p)]
        assert g["lr_multiplier"] == pytest.approx(lr, rel=1e-12), name
        assert g["wd_multiplier"] == wd, name
        assert g["is_last_layer"] == ("last_layer" in name), name
    # hand-computed: depth 6 -> patch embedding 0.9^7 x 0.2, block 0 0.9^6, block 5 0.9, final norm and heads 1
    by_name = {n: ours[id(p)]["lr_multiplier"] for n, p in names.items()}
    assert by_name["backbone.patch_embed.proj.weight"] == pytest.approx(0.9**7 * 0.2)
    assert by_name["backbone.cls_token"] == by_name["mask_token"] == by_name["backbone.reg_token"]
    assert by_name["backbone.cls_token"] == pytest.approx(0.9**7)
    assert by_name["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(0.9**6)
    assert by_name["backbone.blocks.5.mlp.fc2.weight"] == pytest.approx(0.9)
    assert by_name["backbone.norm.weight"] == by_name["head.mlp.0.weight"] == 1.0


def test_default_param_groups_are_dinos_two_groups():
    student = _tiny_student()
    groups = param_groups(student)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert sum(len(g["params"]) for g in groups) == len(list(student.parameters()))
    assert groups[1]["weight_decay"] == 0.0 and all(g["lr_multiplier"] == 1.0 for g in groups)
    backbone_only = param_groups(student, backbone_lr_mult=0.1)
    mult = {id(p): g["lr_multiplier"] for g in backbone_only for p in g["params"]}
    assert mult[id(student.backbone.blocks[0].attn.qkv.weight)] == 0.1 and mult[id(student.mask_token)] == 0.1
    assert mult[id(student.head.last_layer.weight_v)] == 1.0


# ------------------------------------------------------------------------------------------------ clipping
def test_clip_per_module_is_a_global_norm_per_module():
    a, b = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    a.weight.grad = torch.tensor([[3.0, 4.0]])  # norm 5
    b.weight.grad = torch.tensor([[1.0]])  # norm 1: under the cap, unchanged
    total = clip_gradients_per_module([a, b], 2.5)
    assert total == pytest.approx(math.sqrt(26.0))
    coef = 2.5 / (5.0 + 1e-6)  # torch / official: max_norm / (norm + 1e-6)
    assert torch.allclose(a.weight.grad, torch.tensor([[3.0 * coef, 4.0 * coef]]))
    assert torch.equal(b.weight.grad, torch.tensor([[1.0]]))


# ------------------------------------------------------------------------------------------------ drop path
def test_uniform_drop_path_sets_every_block():
    uniform = build_backbone("dinov2_vits14", drop_path_rate=0.3, drop_path_uniform=True, img_size=56)
    rates = [(b.drop_path1.drop_prob, b.drop_path2.drop_prob) for b in uniform.blocks]
    assert rates == [(0.3, 0.3)] * 12
    ramp = build_backbone("dinov2_vits14", drop_path_rate=0.3, img_size=56)
    first, last = ramp.blocks[0].drop_path1, ramp.blocks[-1].drop_path1
    assert isinstance(first, torch.nn.Identity) and last.drop_prob == pytest.approx(0.3)  # timm's linear ramp
    with pytest.raises(ValueError, match="drop_path_uniform needs a ViT"):
        build_backbone("convnextv2_tiny", drop_path_rate=0.3, drop_path_uniform=True)


# ------------------------------------------------------------------------- the training step with the options
def _v2_options(**optimizer) -> dict:
    cfg = tiny_dino()
    cfg["loss"] = {**cfg["loss"], "ibot_weight": 1.0, "koleo_weight": 0.1}
    cfg["optimizer"] = {
        **cfg["optimizer"],
        "layerwise_decay": 0.9,
        "patch_embed_lr_mult": 0.2,
        "clip_mode": "per_module",
        "freeze_last_layer_mode": "zero_lr",
        **optimizer,
    }
    cfg["ibot_head"] = {"separate": True, "out_dim": 24, "hidden_dim": 16, "bottleneck_dim": 8, "nlayers": 2}
    return cfg


def test_dinov2_options_train_with_lr_zero_last_layer_and_separate_ibot_head(tmp_path):
    torch.manual_seed(0)
    module = DINOModule(TINY_VIT, _v2_options(), batch_size=4, diagnostics_every_n_steps=0)
    assert module.student.ibot_head.last_layer.weight_v.shape == (24, 8)  # its own prototypes
    last_before = module.student.head.last_layer.weight_v.detach().clone()
    ibot_before = module.student.ibot_head.mlp[0].weight.detach().clone()
    trainer = quiet_trainer(tmp_path)
    trainer.fit(module, train_dataloaders=crop_batches(2, batch_size=4))
    optimizer = trainer.optimizers[0]
    last = [g for g in optimizer.param_groups if g["is_last_layer"]]
    assert last and all(g["lr"] == 0.0 for g in last)  # epoch 0 < freeze_last_layer: lr 0 ...
    weight_v = module.student.head.last_layer.weight_v
    assert torch.equal(weight_v.detach(), last_before)  # ... so the prototypes stay ...
    assert optimizer.state[weight_v]["exp_avg"].abs().sum() > 0  # ... while AdamW's moments accumulate (official)
    assert not torch.equal(module.student.ibot_head.mlp[0].weight.detach(), ibot_before)  # the iBOT head learns
    # the teacher's iBOT head follows by EMA
    assert not torch.equal(module.teacher.ibot_head.mlp[0].weight, ibot_before)
    # lr multipliers applied to the scheduled lr: the patch embedding's group at lr x 0.9^7 x 0.2
    patch = module.student.backbone.patch_embed.proj.weight
    group = next(g for g in optimizer.param_groups if any(p is patch for p in g["params"]))
    plain = next(g for g in optimizer.param_groups if g["name"] == "decay")
    assert group["lr"] == pytest.approx(plain["lr"] * 0.9**7 * 0.2)

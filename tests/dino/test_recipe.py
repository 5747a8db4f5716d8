"""The typed DINO recipe: every config that sets ``dino`` parses, a misspelt key names the closest valid one, a wrong
type or range names the key, and DINOModule reads the recipe while checkpoints keep the plain dict."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import surgenet_ssl.config.resolvers  # noqa: F401 - registers the config resolvers
from support.tiny_training import TINY_BACKBONE, tiny_dino
from surgenet_ssl.config.checks import ConfigError
from surgenet_ssl.config.dirs import CONFIG_DIR
from surgenet_ssl.dino.recipe import DinoRecipe, LossRecipe, dino_recipe

CONFIGS = CONFIG_DIR


def _composed_dino(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return OmegaConf.to_container(cfg.dino, resolve=True)


def _with(cfg: dict, dotted: str, value=...) -> dict:
    """A deep copy of ``cfg`` with ``dotted`` set to ``value`` (``...``: removed)."""
    cfg = copy.deepcopy(cfg)
    *parents, last = dotted.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return cfg


# ------------------------------------------------------------------------------------------ every config parses
@pytest.mark.parametrize("recipe", sorted(p.stem for p in (CONFIGS / "dino").glob("*.yaml")))
@pytest.mark.parametrize("dataset", ["demo", "cholec"])  # demo: with the short demo schedule (schedule/demo.yaml)
def test_every_dino_config_parses(recipe, dataset):
    cfg = _composed_dino(f"dino={recipe}", f"dataset={dataset}")
    parsed = DinoRecipe.from_dict(cfg)
    assert parsed.out_dim == cfg["out_dim"]
    assert parsed.optimizer.freeze_last_layer == cfg["optimizer"]["freeze_last_layer"]
    assert DinoRecipe.from_dict(parsed.to_dict()) == parsed
    for section in ("head", "crops", "loss", "optimizer", "teacher"):  # the yaml sets every key the recipe knows
        assert set(cfg[section]) == {f.name for f in dataclasses.fields(getattr(parsed, section))}, section


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")))
def test_every_experiment_preset_gives_a_valid_recipe(experiment):
    DinoRecipe.from_dict(_composed_dino(f"experiment={experiment}"))


def test_recipe_values_of_the_yaml_files():
    dino = DinoRecipe.from_dict(dino_recipe())
    v2 = DinoRecipe.from_dict(_composed_dino("dino=dinov2", "dataset=cholec"))  # cholec: no demo schedule
    assert dino.out_dim == 65536 and dino.crops.local_number == 8 and dino.crops.blur_p == (1.0, 0.1, 0.5)
    assert dino.optimizer.betas == (0.9, 0.999) and dino.optimizer.freeze_last_layer == 1
    assert (dino.loss.centering, dino.loss.koleo_weight, dino.loss.ibot_weight) == ("centering", 0.0, 0.0)
    assert (v2.loss.centering, v2.loss.koleo_weight, v2.loss.ibot_weight) == ("sinkhorn_knopp", 0.1, 1.0)
    # dinov2 is the official DINOv2 recipe, not DINO + loss options (each value: tests/dino/test_dinov2_recipe.py)
    assert (v2.teacher.momentum, v2.loss.teacher_temp, v2.optimizer.lr_scaling) == (0.992, 0.07, "sqrt")
    with pytest.raises(dataclasses.FrozenInstanceError):
        dino.optimizer.base_lr = 1.0  # type: ignore[misc]


def test_left_out_or_null_keys_take_the_defaults_the_code_always_used():
    parsed = DinoRecipe.from_dict(tiny_dino())  # no betas, no augmentation knobs, no DINOv2 options
    assert parsed.optimizer.betas == (0.9, 0.999) and parsed.crops.flip_p == 0.5
    assert parsed.loss.sinkhorn_iterations == 3
    nulls = _with(_with(tiny_dino(), "loss.centering", None), "loss.koleo_weight", None)
    assert DinoRecipe.from_dict(nulls).loss == parsed.loss
    assert DinoRecipe.from_dict(_with(tiny_dino(), "head")).head == DinoRecipe.from_dict(dino_recipe()).head
    assert isinstance(
        DinoRecipe.from_dict(_with(tiny_dino(), "optimizer.warmup_epochs", 1)).optimizer.warmup_epochs, float
    )


# ------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "key, closest",
    [
        ("optimizer.freeze_last_layr", "dino.optimizer.freeze_last_layer"),
        ("loss.teacher_tmp", "dino.loss.teacher_temp"),
        ("crops.solarise_p", "dino.crops.solarize_p"),
        ("head.nlayer", "dino.head.nlayers"),
        ("lose", "dino.loss"),
        ("outdim", "dino.out_dim"),
    ],
)
def test_a_misspelt_key_names_its_path_and_the_closest_valid_name(key, closest):
    with pytest.raises(ConfigError) as err:
        DinoRecipe.from_dict(_with(tiny_dino(), key, 1))
    message = str(err.value)
    assert f"unknown config key dino.{key} " in message and f"did you mean {closest}?" in message


def test_a_key_close_to_nothing_lists_the_valid_keys():
    with pytest.raises(
        ConfigError,
        match=r"unknown config key dino\.teacher\.xyz\. Valid keys of dino\.teacher: "
        r"momentum, momentum_end",
    ):
        DinoRecipe.from_dict(_with(tiny_dino(), "teacher.xyz", 1))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("out_dim", "big", "dino.out_dim must be an integer, got 'big'"),
        ("out_dim", True, "dino.out_dim must be an integer, got True"),
        ("optimizer.freeze_last_layer", 1.5, "dino.optimizer.freeze_last_layer must be an integer, got 1.5"),
        ("loss.student_temp", "0.1", "dino.loss.student_temp must be a number, got '0.1'"),
        ("head.use_bn", "no", "dino.head.use_bn must be true or false, got 'no'"),
        ("crops.blur_p", [1.0, 0.5], "dino.crops.blur_p must be a list of 3 numbers, got [1.0, 0.5]"),
        ("optimizer.betas", 0.9, "dino.optimizer.betas must be a list of 2 numbers"),
        ("loss.centering", "sinkhorn", "dino.loss.centering must be 'centering' or 'sinkhorn_knopp', got 'sinkhorn'"),
        ("head", [1], "dino.head must be a mapping"),
        ("loss.center_momentum", 1.5, "dino.loss.center_momentum=1.5: must be in [0, 1]"),
        ("loss.teacher_temp", 0.0, "dino.loss.teacher_temp=0.0: must be > 0"),
        ("crops.local_scale", [0.4, 0.05], "dino.crops.local_scale=[0.4, 0.05]: must be [min, max]"),
        ("crops.color_jitter", [0.4, 0.4, 0.2, 0.7], "dino.crops.color_jitter=[0.4, 0.4, 0.2, 0.7]: needs"),
        ("crops.local_number", -1, "dino.crops.local_number=-1: must be >= 0"),
        ("optimizer.base_lr", ..., "dino.optimizer.base_lr is required"),
        ("teacher", ..., "dino.teacher is required"),
    ],
)
def test_a_wrong_type_or_value_names_the_key(key, value, message):
    with pytest.raises(ConfigError) as err:
        DinoRecipe.from_dict(_with(tiny_dino(), key, value))
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_dino_recipe_overrides_are_checked():
    assert dino_recipe(**{"crops.global_size": 112})["crops"]["global_size"] == 112
    with pytest.raises(ConfigError, match="did you mean dino.crops.global_size"):
        dino_recipe(**{"crops.global_sise": 112})


# ------------------------------------------------------------------------------------------------- DINOModule
def test_module_reads_the_recipe_and_checkpoints_keep_the_plain_dict():
    from surgenet_ssl.training.module import DINOModule

    cfg = tiny_dino()
    module = DINOModule(TINY_BACKBONE, cfg, batch_size=4)
    assert module.recipe == DinoRecipe.from_dict(cfg)
    assert module.hparams["dino"] == cfg and type(module.hparams["dino"]) is dict  # what checkpoints save
    assert module.dino_cfg == cfg
    from_recipe = DINOModule(TINY_BACKBONE, DinoRecipe.from_dict(cfg), batch_size=4)
    assert from_recipe.recipe == module.recipe
    assert type(from_recipe.hparams["dino"]) is dict
    assert DinoRecipe.from_dict(from_recipe.hparams["dino"]) == module.recipe
    module.build_schedules(10, 5, 4)
    from_recipe.build_schedules(10, 5, 4)
    assert all(bool((module.schedules[k] == from_recipe.schedules[k]).all()) for k in module.schedules)


def test_module_refuses_a_misspelt_recipe_key_at_construction():
    from surgenet_ssl.training.module import DINOModule

    with pytest.raises(ConfigError, match="did you mean dino.optimizer.freeze_last_layer"):
        DINOModule(TINY_BACKBONE, _with(tiny_dino(), "optimizer.freeze_last_layr", 1), batch_size=4)


def test_loss_section_alone():
    loss = dataclasses.asdict(DinoRecipe.from_dict(tiny_dino()).loss)
    from surgenet_ssl.config.checks import build_section

    assert build_section(LossRecipe, loss, "dino.loss") == LossRecipe(**loss)
    with pytest.raises(ConfigError, match="dino.loss.koleo_wieght.*did you mean dino.loss.koleo_weight"):
        build_section(LossRecipe, {**loss, "koleo_wieght": 0.1}, "dino.loss")


def test_the_recipe_module_is_plain_python():
    import subprocess
    import sys

    code = (
        "import sys, surgenet_ssl.dino.recipe; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'hydra', 'omegaconf', 'pytorch_lightning', "
        "'lightning'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.stdout.strip() == "[]"

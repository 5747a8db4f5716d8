"""The DINO recipe (``surgenet_ssl/configs/dino/*.yaml``, the ``dino`` config group) as frozen, checked dataclasses.

Built once at start from the config dict with :meth:`DinoRecipe.from_dict`: a misspelt key fails with its path and
the closest valid name (``dino.optimizer.freeze_last_layr`` -> ``dino.optimizer.freeze_last_layer``), a wrong type
or an out-of-range value with the key. Keys without a default here are required; a key left out (or null) takes
the default, which is the value the training code always fell back to. Plain Python: no Lightning, no Hydra.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from surgenet_ssl.config.checks import at_least, build_section, greater_than, in_range, increasing_pair, option

__all__ = [
    "CropsRecipe",
    "DinoRecipe",
    "HeadRecipe",
    "IbotHeadRecipe",
    "LossRecipe",
    "OptimizerRecipe",
    "TeacherRecipe",
    "dino_recipe",
]

_PROBABILITY = in_range(0.0, 1.0)
_POSITIVE = greater_than(0.0)


def _color_jitter(value: tuple[float, ...]) -> str | None:
    bri, con, sat, hue = value
    ok = min(value) >= 0 and bri <= 1 and con <= 1 and sat <= 1 and hue <= 0.5
    return None if ok else "needs [brightness, contrast, saturation, hue]: the first three in [0, 1], hue in [0, 0.5]"


@dataclass(frozen=True)
class HeadRecipe:
    """``dino.head``: the projection head (DINOHead's arguments besides the input and output sizes)."""

    hidden_dim: int = option(2048, at_least(1))
    bottleneck_dim: int = option(256, at_least(1))
    nlayers: int = option(3, at_least(1))
    use_bn: bool = option(False)
    norm_last_layer: bool = option(True)
    fp32_head: bool = option(True)  # the head in fp32 under bf16/fp16 autocast (precise teacher targets)


@dataclass(frozen=True)
class IbotHeadRecipe:
    """``dino.ibot_head``: DINOv2's separate iBOT head (official for ViT-L/g: 131,072 prototypes); with
    ``separate=false`` (the default) the iBOT loss uses the DINO head, as DINOv2's default config."""

    separate: bool = option(False)
    out_dim: int = option(65536, at_least(1))
    hidden_dim: int = option(2048, at_least(1))
    bottleneck_dim: int = option(256, at_least(1))
    nlayers: int = option(3, at_least(1))


@dataclass(frozen=True)
class CropsRecipe:
    """``dino.crops``: multi-crop geometry and the augmentation strengths/probabilities (official DINO values)."""

    global_size: int = option(224, at_least(1))
    local_size: int = option(96, at_least(1))
    global_scale: tuple[float, float] = option((0.4, 1.0), increasing_pair(0.0, 1.0, lo_open=True))
    local_scale: tuple[float, float] = option((0.05, 0.4), increasing_pair(0.0, 1.0, lo_open=True))
    local_number: int = option(8, at_least(0))
    flip_p: float = option(0.5, _PROBABILITY)
    color_jitter: tuple[float, float, float, float] = option((0.4, 0.4, 0.2, 0.1), _color_jitter)
    color_jitter_p: float = option(0.8, _PROBABILITY)
    grayscale_p: float = option(0.2, _PROBABILITY)
    blur_p: tuple[float, float, float] = option((1.0, 0.1, 0.5), _PROBABILITY)  # global 1, global 2, locals
    blur_sigma: tuple[float, float] = option((0.1, 2.0), increasing_pair(0.0, lo_open=True))
    solarize_p: float = option(0.2, _PROBABILITY)
    solarize_threshold: int = option(128, in_range(0, 256))
    # Temporal positives (off: DINO's recipe): with this probability the second global crop is cut from a
    # neighbouring frame of the same video, at most temporal_window_s seconds away (README "Curation").
    temporal_positive_p: float = option(0.0, _PROBABILITY)
    temporal_window_s: float = option(2.0, _POSITIVE)


@dataclass(frozen=True)
class LossRecipe:
    """``dino.loss``: temperatures and centering, and the DINOv2 options (off in the DINO recipe)."""

    student_temp: float = option(check=_POSITIVE)
    teacher_temp: float = option(check=_POSITIVE)
    warmup_teacher_temp: float = option(check=_POSITIVE)
    warmup_teacher_temp_epochs: float = option(check=at_least(0))
    center_momentum: float = option(check=_PROBABILITY)
    centering: Literal["centering", "sinkhorn_knopp"] = option("centering")
    sinkhorn_iterations: int = option(3, at_least(1))
    koleo_weight: float = option(0.0, at_least(0))
    ibot_weight: float = option(0.0, at_least(0))
    ibot_mask_probability: float = option(0.5, _PROBABILITY)
    ibot_mask_ratio: tuple[float, float] = option((0.1, 0.5), increasing_pair(0.0, 1.0))


@dataclass(frozen=True)
class OptimizerRecipe:
    """``dino.optimizer``: AdamW with the lr/weight-decay schedules, clipping and last-layer freezing."""

    base_lr: float = option(check=at_least(0))  # scaled by the lr_scaling rule of global batch / reference_batch
    min_lr: float = option(check=at_least(0))
    warmup_epochs: float = option(check=at_least(0))
    weight_decay: float = option(check=at_least(0))
    weight_decay_end: float = option(check=at_least(0))
    freeze_last_layer: int = option(check=at_least(0))  # epochs during which the head's last layer is not updated
    reference_batch: int = option(256, at_least(1))
    betas: tuple[float, float] = option((0.9, 0.999), in_range(0.0, 1.0, hi_open=True))
    clip_grad: float = option(0.0, at_least(0))  # gradient norm cap (see clip_mode); 0 disables
    # DINOv2 (ssl_default_config.yaml); the defaults are DINO's behaviour
    lr_scaling: Literal["linear", "sqrt"] = option("linear")  # base_lr x (global / reference), or its square root
    layerwise_decay: float = option(1.0, in_range(0.0, 1.0, lo_open=True))  # ViT block i: lr x decay^(depth - i)
    patch_embed_lr_mult: float = option(1.0, at_least(0))  # the patch embedding's lr, on top of the layer decay
    backbone_lr_mult: float = option(1.0, at_least(0))  # the whole backbone (a loaded one learns slower than the head)
    clip_mode: Literal["per_parameter", "per_module"] = option("per_parameter")  # DINO / DINOv2 (global per module)
    freeze_last_layer_mode: Literal["drop_gradient", "zero_lr"] = option("drop_gradient")  # DINO / DINOv2


@dataclass(frozen=True)
class TeacherRecipe:
    """``dino.teacher``: the EMA momentum schedule (cosine from ``momentum`` to ``momentum_end``)."""

    momentum: float = option(check=_PROBABILITY)
    momentum_end: float = option(check=_PROBABILITY)


@dataclass(frozen=True)
class DinoRecipe:
    """The whole ``dino`` config group. ``DinoRecipe.from_dict(cfg)`` checks it; ``to_dict()`` gives it back."""

    # required, as option(check=...) without a default, but written as field() so that type checkers see no default
    out_dim: int = field(metadata={"check": at_least(1)})
    loss: LossRecipe = field()
    optimizer: OptimizerRecipe = field()
    teacher: TeacherRecipe = field()
    head: HeadRecipe = field(default_factory=HeadRecipe)
    crops: CropsRecipe = field(default_factory=CropsRecipe)
    ibot_head: IbotHeadRecipe = field(default_factory=IbotHeadRecipe)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], path: str = "dino") -> DinoRecipe:
        """The recipe of a ``dino`` config dict; raises ``ConfigError`` (a ValueError) naming the bad key."""
        return build_section(cls, cfg, path)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists, as in the yaml files (``DinoRecipe.from_dict(r.to_dict()) == r``)."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def dino_recipe(**overrides: Any) -> dict[str, Any]:
    """The recipe of ``surgenet_ssl/configs/dino/default.yaml`` as a plain dict, for code that builds a
    ``DINOModule`` without Hydra (benchmark scripts): one source of the recipe's values instead of copies that drift.
    Dotted overrides, e.g. ``dino_recipe(**{"crops.global_size": 112, "out_dim": 4096})``; a misspelt override key
    fails here, with the closest valid name."""
    from omegaconf import OmegaConf  # (only here: the dataclasses above are plain Python)

    from surgenet_ssl.config.dirs import CONFIG_DIR

    cfg = OmegaConf.load(CONFIG_DIR / "dino" / "default.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    recipe: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    DinoRecipe.from_dict(recipe)
    return recipe

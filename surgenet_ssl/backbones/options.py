"""The ``backbone.*`` config options as :func:`surgenet_ssl.backbones.build_backbone` kwargs, shared by every
place that rebuilds a trained backbone (evaluation, fine-tuning)."""

from __future__ import annotations

from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

__all__ = ["backbone_options"]


def backbone_options(backbone_cfg: DictConfig | dict) -> dict[str, Any]:
    """The ``backbone.*`` options as build_backbone kwargs, exactly as training passes them to the teacher
    (DINOModule: every key but ``name``; ``drop_path_rate`` is the student's only), so a model trained with e.g.
    ``+backbone.reg_tokens=4`` is rebuilt with the same architecture."""
    if isinstance(backbone_cfg, DictConfig):
        given = cast("dict[str, Any]", OmegaConf.to_container(backbone_cfg, resolve=True))
    else:
        given = backbone_cfg
    # training options (continued pretraining), not architecture; imported here: init_weights imports torch
    from surgenet_ssl.training.init_weights import INIT_KEYS

    skip = ("name", "drop_path_rate", "drop_path_uniform", *INIT_KEYS)  # (drop path: the student's only)
    options = {k: v for k, v in given.items() if k not in skip}
    for key in ("timm_name", "img_size"):  # null: the model's own default (ViTs: any size loads, pos_embed resampled)
        if not options.get(key):
            options.pop(key, None)
    return options

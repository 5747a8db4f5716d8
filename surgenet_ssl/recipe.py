"""The DINO recipe of ``surgenet_ssl/configs/dino/default.yaml`` as a plain dict, for code that builds a
``DINOModule`` without Hydra (benchmark scripts): one source of the recipe's values instead of copies that drift. Its
typed, checked form is :class:`surgenet_ssl.dino.recipe.DinoRecipe`."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from surgenet_ssl.config_dirs import CONFIG_DIR
from surgenet_ssl.dino.recipe import DinoRecipe

DINO_RECIPE = CONFIG_DIR / "dino" / "default.yaml"


def dino_recipe(**overrides: Any) -> dict[str, Any]:
    """The recipe dict with dotted overrides, e.g. ``dino_recipe(**{"crops.global_size": 112, "out_dim": 4096})``."""
    cfg = OmegaConf.load(DINO_RECIPE)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    recipe: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    DinoRecipe.from_dict(recipe)  # a misspelt override key fails here, with the closest valid name
    return recipe

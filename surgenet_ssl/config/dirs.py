"""Where the Hydra configs come from: the package's own (``surgenet_ssl/configs``, shipped in the wheel, so an
installed package needs no checkout) and the user's folders named by ``SURGENET_SSL_CONFIG_DIR``.

The user's folders are added to Hydra's search path by the ``hydra.searchpath`` key of every primary config
(``${surgenet.user_config_dirs:}``), so a user adds dataset mixtures, backbones or experiment grids in their own
repository without editing the package. Hydra searches them after the package's configs (as it does a
``--config-dir``), so they add options and cannot replace one: a file named like a shipped option would be ignored,
which is an error here rather than a surprise. Light on purpose (no torch): the entry points import it before Hydra
composes anything.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

__all__ = ["CONFIG_DIR", "ENV_VAR", "user_config_dirs", "user_search_path"]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # surgenet_ssl/configs
ENV_VAR = "SURGENET_SSL_CONFIG_DIR"


class UserConfigDirError(ValueError):
    """A folder in SURGENET_SSL_CONFIG_DIR is missing or would shadow a shipped config."""


def user_config_dirs(value: str | None = None) -> list[Path]:
    """The folders of ``SURGENET_SSL_CONFIG_DIR`` (``os.pathsep``-separated, first listed searched first), checked:
    each must be an existing directory, and none may hold a file with the name of one of the package's configs."""
    value = os.environ.get(ENV_VAR, "") if value is None else value
    dirs = []
    for entry in value.split(os.pathsep):
        if not entry.strip():
            continue  # an empty entry (``DIR:`` or an unset variable) adds nothing
        path = Path(entry).expanduser().resolve()
        if not path.is_dir():
            raise UserConfigDirError(
                f"{ENV_VAR}: {entry!r} is not a directory. Set it to your config folder(s), separated by "
                f"{os.pathsep!r}, each holding group folders such as dataset/, backbone/, experiment/."
            )
        shadowed = sorted(
            str(p.relative_to(path)) for p in path.rglob("*.yaml") if (CONFIG_DIR / p.relative_to(path)).is_file()
        )
        if shadowed:
            raise UserConfigDirError(
                f"{ENV_VAR}: {path} holds {', '.join(shadowed)}, the name(s) of surgenet-ssl's own config(s), which "
                f"come first in the search path, so yours would be ignored. Rename yours (e.g. dataset/my_mix.yaml); "
                f"it can start from the shipped one with `defaults: [<name>, _self_]` and change what differs."
            )
        dirs.append(path)
    return dirs


def user_search_path() -> list[str]:
    """``hydra.searchpath`` entries for the user's folders (the ``surgenet.user_config_dirs`` resolver)."""
    return [f"file://{path}" for path in user_config_dirs()]


# Registered on import: every entry point (and test composing the configs) imports CONFIG_DIR from here.
OmegaConf.register_new_resolver("surgenet.user_config_dirs", user_search_path, replace=True)

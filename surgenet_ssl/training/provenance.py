"""How a run was started, for the model card and the run's checkpoints: the command to rerun it, Hydra's task
overrides, the package version and the git commit of the code (best effort: never raises)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from surgenet_ssl import __version__

__all__ = ["git_commit", "run_provenance"]

_PACKAGE = Path(__file__).resolve().parents[1]  # surgenet_ssl/ (this file is surgenet_ssl/training/provenance.py)


def git_commit(where: str | Path | None = None) -> str:
    """The git commit of the code (the checkout this package is imported from), ``+ " (with uncommitted changes)"``
    when tracked files differ from it; "unknown" when the package is not in a git checkout or git is missing.
    Never raises: a model card must not fail over provenance."""
    package = Path(where) if where is not None else _PACKAGE
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=20, env=env)

    try:
        # tracked here, not merely inside some other repository (e.g. a venv in a project checkout)
        if git("ls-files", "--error-unmatch", "--", "__init__.py").returncode != 0:
            return "unknown"
        head = git("rev-parse", "HEAD")
        if head.returncode != 0 or not head.stdout.strip():
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError, ValueError):
        return "unknown"
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def _module_of(script: str) -> str | None:
    """``.../surgenet_ssl/train.py`` -> ``surgenet_ssl.train`` (what ``python -m`` was given)."""
    try:
        path = Path(script).resolve()
        rel = path.relative_to(_PACKAGE.parent)
    except (ValueError, OSError):
        return None
    return ".".join(rel.with_suffix("").parts) if path.suffix == ".py" else None


def _program(argv0: str) -> list[str]:
    """The command that started this process, as a user would type it again: ``python -m surgenet_ssl.train`` or
    the console script ``surgenet-ssl-train`` (pyproject ``[project.scripts]``), else ``python <script>``."""
    module = _module_of(argv0) if argv0 else None
    if module:
        return ["python", "-m", module]
    if Path(argv0).name.startswith("surgenet-ssl-"):
        return [Path(argv0).name]  # on PATH wherever the package is installed
    return ["python", argv0] if argv0 else ["python"]


def run_provenance() -> dict[str, Any]:
    """How this run was started, for the model card: a copy-pasteable ``command``, Hydra's task ``overrides`` and
    the ``git_commit`` of the code. In a Hydra multirun job the command is the job's own (its overrides)."""
    overrides: list[str] = []
    multirun = False
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            hydra_cfg = HydraConfig.get()
            overrides = [str(o) for o in hydra_cfg.overrides.task]
            multirun = str(hydra_cfg.mode).endswith("MULTIRUN")
    except Exception:  # noqa: BLE001 - provenance is best effort
        pass
    args = overrides if multirun else sys.argv[1:]
    return {
        "command": shlex.join(_program(sys.argv[0] if sys.argv else "") + list(args)),
        "overrides": overrides,
        "git_commit": git_commit(),
        "version": __version__,
    }

"""Entry points on top: every ``python -m surgenet_ssl.<name>`` module (pyproject's ``[project.scripts]``) is a thin
layer over library modules, and no module of the package imports one of them, at the top or inside a function (an
AST walk of the whole module). What two entry points share lives in a library module both import: the teacher
export in ``surgenet_ssl.training.teacher_export``, the Trainer set-up in ``surgenet_ssl.training.trainer``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "surgenet_ssl"
ENTRY_POINTS = ("train", "prepare", "export", "evaluate", "finetune", "report", "datasets", "curate")


def _module_name(path: Path, root: Path = REPO) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path, root: Path = REPO) -> set[str]:
    """Every module (and ``module.name``) the file imports anywhere in it, relative imports resolved."""
    package = _module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
        elif (  # importlib.import_module("surgenet_ssl.<name>")
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Attribute, ast.Name))
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return found


def test_the_entry_points_are_the_console_scripts():
    table = (REPO / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    scripts = re.findall(r'^surgenet-ssl-\S+ = "surgenet_ssl\.(\w+):main"$', table, re.M)
    assert sorted(scripts) == sorted(ENTRY_POINTS)  # a new entry point belongs in ENTRY_POINTS too


def test_no_module_imports_an_entry_point():
    entry_points = {f"surgenet_ssl.{name}" for name in ENTRY_POINTS}
    importers = {
        _module_name(path): sorted(entry_points & _imports(path))
        for path in sorted(PACKAGE.rglob("*.py"))
        if entry_points & _imports(path)
    }
    assert importers == {}


def test_the_import_walk_sees_imports_inside_functions(tmp_path):
    (tmp_path / "surgenet_ssl" / "downstream").mkdir(parents=True)
    probe = tmp_path / "surgenet_ssl" / "downstream" / "probe.py"
    probe.write_text(
        "def f():\n    from surgenet_ssl.train import trainer_kwargs\n"
        "def g():\n    from .. import evaluate\n"
        "def h():\n    import importlib\n    importlib.import_module('surgenet_ssl.export')\n"
    )
    found = _imports(probe, root=tmp_path)
    assert {"surgenet_ssl.train", "surgenet_ssl.evaluate", "surgenet_ssl.export"} <= found


def test_pretraining_and_fine_tuning_share_the_trainer_set_up():
    assert "surgenet_ssl.training.trainer" in _imports(PACKAGE / "training" / "pretrain.py")
    assert "surgenet_ssl.training.trainer" in _imports(PACKAGE / "downstream" / "runner.py")


def test_cli_and_callback_share_the_export_library_module():
    assert "surgenet_ssl.training.teacher_export" in _imports(PACKAGE / "export.py")
    assert "surgenet_ssl.training.teacher_export" in _imports(PACKAGE / "callbacks" / "export.py")
    assert "surgenet_ssl.training.provenance" in _imports(PACKAGE / "callbacks" / "export.py")

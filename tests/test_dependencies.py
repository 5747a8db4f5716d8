"""Every third-party module the package and its scripts import is a declared dependency in pyproject.toml."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_top_level_modules(tree: ast.AST) -> set[str]:
    """Top-level names of absolute imports anywhere in a module (lazy imports in functions count: they run too),
    except under ``if TYPE_CHECKING:``, which never runs."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_dependencies() -> set[str]:
    """The dependencies, plus those of the feature extras (e.g. ``parquet``: imported only by the feature that needs
    it, with an error naming the extra); the ``test`` extra is not a feature."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra, extra_specs in project.get("optional-dependencies", {}).items():
        if extra != "test":
            specs += extra_specs
    return {_normalise(re.match(r"[A-Za-z0-9._-]+", spec).group(0)) for spec in specs}


def third_party_imports() -> dict[str, set[str]]:
    """module -> files importing it, for every module that is neither stdlib nor ours."""
    local = {"surgenet_ssl"} | {p.stem for p in (REPO / "scripts").glob("*.py")}
    out: dict[str, set[str]] = {}
    for folder in ("surgenet_ssl", "scripts"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for module in imported_top_level_modules(ast.parse(path.read_text(), filename=str(path))):
                if module not in sys.stdlib_module_names and module not in local and module != "__future__":
                    out.setdefault(module, set()).add(str(path.relative_to(REPO)))
    return out


def test_ast_walk_finds_lazy_imports_and_skips_type_checking():
    tree = ast.parse(
        "import a.b\nfrom c import d\nfrom . import e\nif TYPE_CHECKING:\n    import f\nelse:\n    import g\n"
        "def h():\n    import i\n"
    )
    assert imported_top_level_modules(tree) == {"a", "c", "g", "i"}


def test_every_imported_third_party_module_is_a_declared_dependency():
    declared = declared_dependencies()
    distributions = md.packages_distributions()
    undeclared = []
    for module, files in sorted(third_party_imports().items()):
        # not installed here (e.g. decord on aarch64): the distribution is expected to carry the module's name
        candidates = {_normalise(d) for d in distributions.get(module, [module])}
        if not candidates & declared:
            undeclared.append(
                f"{module} (distribution {', '.join(sorted(candidates))}; imported by {', '.join(sorted(files)[:3])})"
            )
    assert not undeclared, "imported but not in pyproject.toml [project.dependencies]: " + "; ".join(undeclared)

"""The export logic is a library module (surgenet_ssl.teacher_export) that the CLI and the callback both import;
no library module imports the entry point ``surgenet_ssl.export``."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "surgenet_ssl"


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_no_library_module_imports_the_export_entry_point():
    importers = [
        str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.py")) if "surgenet_ssl.export" in _imports(p)
    ]
    assert importers == []


def test_cli_and_callback_share_the_library_module():
    assert "surgenet_ssl.teacher_export" in _imports(PACKAGE / "export.py")
    assert "surgenet_ssl.teacher_export" in _imports(PACKAGE / "callbacks" / "export.py")
    assert "surgenet_ssl.provenance" in _imports(PACKAGE / "callbacks" / "export.py")

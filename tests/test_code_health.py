"""The code-health gate: ruff (lint + format) and mypy, configured in pyproject.toml, pass on the whole tree.

They run here so that the README's test command (``python -m pytest -q``, which CI runs) covers them. The tools come
with the ``test`` extra (``pip install -e ".[test]"``); a missing tool fails the test, saying how to install it
(a skip would let the suite pass with no gate at all).
To fix a finding: ``ruff check --fix`` (safe fixes), ``ruff format``, then what ``mypy`` still reports.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINTED = ["surgenet_ssl", "scripts", "tests"]  # mypy checks the package: [tool.mypy] files in pyproject.toml


def _run(tool: str, *args: str, timeout: float) -> None:
    if importlib.util.find_spec(tool) is None:
        pytest.fail(f"{tool} is not installed: pip install -e '.[test]' installs it")
    proc = subprocess.run(
        [sys.executable, "-m", tool, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"`{tool} {' '.join(args)}` failed:\n{proc.stdout}{proc.stderr}"


def test_ruff_check() -> None:
    _run("ruff", "check", "--no-cache", *LINTED, timeout=120)


def test_ruff_format() -> None:
    _run("ruff", "format", "--check", "--no-cache", *LINTED, timeout=120)


@pytest.mark.slow  # ~50 s on 2 busy cores without a cache (as in CI), a few seconds with .mypy_cache
def test_mypy() -> None:
    _run("mypy", timeout=600)

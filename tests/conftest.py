"""Shared fixtures: keep every test off the network and out of the user's caches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One demo-data cache per test session (generating it takes a few seconds)."""
    path = Path(os.environ.get("SURGENET_TEST_CACHE", tmp_path_factory.mktemp("surgenet_cache")))
    path.mkdir(parents=True, exist_ok=True)
    return path

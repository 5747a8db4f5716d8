"""Shared fixtures: keep every test off the network and out of the user's caches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _share_the_cores() -> None:
    """Under pytest-xdist, torch in each test process gets its share of the cores: two processes with a thread per
    core each would oversubscribe the machine, and torch's spinning threads then make each other several times
    slower (the default demo run took 3x as long next to another test)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        from surgenet_ssl.runtime.resources import usable_cpus

        torch.set_num_threads(max(1, usable_cpus() // workers))


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

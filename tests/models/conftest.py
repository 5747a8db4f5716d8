"""Fixtures for the downstream-model tests: published-format stand-in files and an isolated download cache."""

import pytest
import torch

from backbones.surgenet_keyfile import surgenet_keys  # tests/ is on pythonpath (pyproject)

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def isolated_weight_cache(tmp_path, monkeypatch):
    """Never touch ~/.cache: every test downloads into its own cache directory."""
    cache = tmp_path / "weight-cache"
    monkeypatch.setenv("SURGENET_SSL_CACHE", str(cache))
    return cache


def _published_standin(backbone: str, seed: int = 0, with_head: bool = False) -> dict[str, torch.Tensor]:
    """A stand-in for a published SurgeNet teacher file: exactly the key file's names and shapes (so it does not
    depend on our converter), small random values (finite features)."""
    g = torch.Generator().manual_seed(seed)
    keys = surgenet_keys(backbone, with_head=with_head)
    return {k: 0.02 * torch.randn(shape, generator=g) for k, shape in keys.items()}


@pytest.fixture(scope="session")
def published_files(tmp_path_factory):
    """backbone -> path of a published-format teacher file (SurgeNet naming, flat dict, torch.save)."""
    root = tmp_path_factory.mktemp("published")
    files = {}
    for seed, backbone in enumerate(("caformer_s18", "convnextv2_tiny", "pvt_v2_b2")):
        files[backbone] = root / f"SurgeNet_{backbone}_checkpoint_epoch0050_teacher.pth"
        torch.save(_published_standin(backbone, seed=seed), files[backbone])
    return files


@pytest.fixture(scope="session")
def published_standin():
    """The stand-in factory: ``published_standin(backbone, seed=0, with_head=False) -> dict``."""
    return _published_standin

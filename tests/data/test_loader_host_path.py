"""Host side of the hot path: persistent workers still reseed every epoch; loader options from the data config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from data.data_media import write_source
from surgenet_ssl.data.loader import build_train_loader
from surgenet_ssl.training.datamodule import loader_options


def uint8_crop(img: Image.Image) -> list[torch.Tensor]:
    return [pil_to_tensor(img.convert("RGB"))]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = tmp_path_factory.mktemp("prepared")
    write_source(r, "a", videos=2, frames_per_video=20, shard_max=10)
    return r


def _epochs(root: Path, persistent: bool, epochs: int = 3) -> list[list[str]]:
    loader = build_train_loader(
        {"name": "a", "sources": {"a": None}},
        root,
        uint8_crop,
        batch_size=4,
        num_workers=2,
        steps_per_epoch=4,
        shuffle_buffer=8,
        persistent_workers=persistent,
        prefetch_factor=3,
    )
    assert loader.persistent_workers == persistent and loader.prefetch_factor == 3
    out = []
    for epoch in range(epochs):
        loader.dataset.set_epoch(epoch)
        batches = list(loader)
        assert all(b["crops"][0].dtype == torch.uint8 for b in batches)
        out.append([k for b in batches for k in b["key"]])
    return out


def test_persistent_workers_follow_the_epoch_like_fresh_workers(root: Path) -> None:
    fresh, kept = _epochs(root, persistent=False), _epochs(root, persistent=True)
    assert kept == fresh  # the same per-epoch order: workers kept alive still see set_epoch
    assert kept[0] != kept[1] != kept[2]


def test_loader_options_from_the_data_config() -> None:
    assert loader_options({}, None) == {"pin_memory": False, "persistent_workers": False, "prefetch_factor": None}
    cfg = {"pin_memory": "auto", "persistent_workers": True, "prefetch_factor": 4}
    assert loader_options(cfg, None) == {"pin_memory": False, "persistent_workers": True, "prefetch_factor": 4}
    assert loader_options({"pin_memory": True}, None)["pin_memory"] is True

"""Fixtures for the downstream and report tests: one thread, tiny datasets made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from downstream.helpers import make_seg_folder

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def seg_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seg")
    make_seg_folder(root / "train", cases=("case1", "case2", "case3"), per_case=3)
    make_seg_folder(root / "val", cases=("case9",), per_case=2, seed=1)
    return root


@pytest.fixture(scope="session")
def demo_labels(tmp_path_factory) -> Path:
    from surgenet_ssl.data.demo_labels import ensure_demo_labels

    return ensure_demo_labels(tmp_path_factory.mktemp("cache"))

"""Loader workers run one torch and one OpenCV thread: each worker is one of the training process' cores."""

from __future__ import annotations

from pathlib import Path

import cv2
import torch

from data.data_media import write_source
from surgenet_ssl.data.loader import build_train_loader


def thread_counts(img) -> list[torch.Tensor]:
    """Transform that reports the worker's thread settings instead of crops."""
    return [torch.tensor([torch.get_num_threads(), cv2.getNumThreads()])]


def test_workers_are_single_threaded(tmp_path: Path) -> None:
    write_source(tmp_path, "a", videos=1, frames_per_video=8, shard_max=100)
    cfg = {"name": "a", "sources": {"a": None}, "fraction": 1.0, "allow_missing": False}
    previous = cv2.getNumThreads()
    cv2.setNumThreads(4)  # what a worker would inherit from a training process with an OpenCV pool
    try:
        loader = build_train_loader(
            cfg, tmp_path, thread_counts, batch_size=2, num_workers=1, steps_per_epoch=2, shuffle_buffer=0
        )
        seen = {tuple(row.tolist()) for batch in loader for row in batch["crops"][0]}
    finally:
        cv2.setNumThreads(previous)
    assert seen == {(1, 1)}

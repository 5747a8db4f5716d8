"""The GPU augmentation launches a bounded number of ATen ops per call, whatever the batch (counted on CPU tensors
with a dispatch mode): each op is a kernel launch paid in host time on a GPU (issue 23: 5,103 per call before)."""

from __future__ import annotations

import torch

from surgenet_ssl.data.gpu_augment import GpuMultiCrop
from surgenet_ssl.runtime.performance import AtenOpCounter

MAX_OPS = 500


def _ops_per_call(batch: int, local_number: int = 8, sizes: bool = True) -> int:
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (batch, 3, 40, 72), generator=g, dtype=torch.uint8)
    hw = torch.tensor([[40, 53], [40, 50], [40, 40], [40, 72]] * batch)[:batch] if sizes else None
    aug = GpuMultiCrop(32, 16, local_crops_number=local_number)
    aug(frames, g, sizes=hw)  # the first call creates the per-device constants
    with AtenOpCounter() as ops:
        crops = aug(frames, g, sizes=hw)
    assert [tuple(c.shape) for c in crops] == [(batch, 3, 32, 32)] * 2 + [(batch, 3, 16, 16)] * local_number
    return ops.total


def test_ops_per_call_are_few_and_do_not_grow_with_the_batch_or_the_crop_count() -> None:
    torch.set_num_threads(1)
    recipe = _ops_per_call(batch=4)
    assert recipe <= MAX_OPS
    assert _ops_per_call(batch=12) == recipe  # one op per step of the recipe, whatever the batch
    assert _ops_per_call(batch=4, local_number=2) == recipe  # ... and the number of local crops
    assert _ops_per_call(batch=4, sizes=False) <= recipe  # whole canvases: no edge replication

"""Zero host reads per training step outside the logging steps, counted on CPU over real Lightning steps.

On CUDA each of these is a host sync (the CPU waits for the GPU queue) or a blocking host-to-device copy:

- ``aten::_local_scalar_dense`` / ``aten::item``: ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)`` of a tensor
  (Lightning's conversion of logged and progress-bar metrics included);
- ``aten::lift_fresh``: a tensor made from Python data (``torch.tensor(v, device=...)``, ``new_tensor([n])``,
  what ``self.log`` does with a Python float): on a device, a copy from host memory;
- ``Tensor.tolist`` / ``.numpy`` / ``.cpu``: device-to-host copies (seen by a function mode: on CPU tensors
  nothing is dispatched).

CPU tensors stand in for device tensors, so host-side reads that are not syncs on CUDA must take the CUDA path:
the step agreement is pipelined (its one read per step is of a pinned host copy made a step earlier, by design;
that read is not counted) and AdamW is the fused kernel (``performance.fused_adamw``, on by default on CUDA; the
unfused one keeps its step counters on the host and reads them each step).
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

import surgenet_ssl.training.module as module_lib
from support.tiny_training import TINY_BACKBONE, crop_batches, tiny_dino
from surgenet_ssl.callbacks import LoggingStepProgressBar, ThroughputMonitor
from surgenet_ssl.runtime.step_agreement import StepAgreement
from surgenet_ssl.training.module import DINOModule

READS = {
    torch.ops.aten._local_scalar_dense.default: "item",
    torch.ops.aten.item.default: "item",
    torch.ops.aten.lift_fresh.default: "tensor from Python data",
}
COPIES = {torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy", torch.Tensor.cpu: "cpu"}
LOG_EVERY = 3


def _where() -> str:
    """The innermost frames of the project or Lightning, for the failure message."""
    frames, f = [], sys._getframe(2)
    while f is not None and len(frames) < 3:
        name = f.f_code.co_filename
        if "surgenet_ssl" in name or "lightning" in name:
            frames.append(f"{name.rsplit('/', 2)[-2]}/{name.rsplit('/', 1)[-1]}:{f.f_lineno} {f.f_code.co_name}")
        f = f.f_back
    return " < ".join(frames)


def _agreement_read() -> bool:
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_name == "_read" and f.f_code.co_filename.endswith("step_agreement.py"):
            return True
        f = f.f_back
    return False


class _Reads(TorchDispatchMode):
    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS:
            self.events.append(f"{READS[func]} at {_where()}")
        return func(*args, **(kwargs or {}))


class _Copies(TorchFunctionMode):
    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in COPIES and not _agreement_read():
            self.events.append(f"{COPIES[func]} at {_where()}")
        return func(*args, **(kwargs or {}))


class HostReadCounter(pl.Callback):
    """Host reads per whole loop iteration: from one batch start to the next (the step, the callbacks, Lightning's
    logging, the next batch and its ``on_after_batch_transfer``), from the second batch on (the first registers
    the logged keys)."""

    def __init__(self) -> None:
        self.per_batch: dict[int, list[str]] = {}
        self._modes: list[Any] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if idx >= 1 and not self._modes:
            self._modes = [_Reads([]), _Copies([])]
            for mode in self._modes:
                mode.__enter__()
        if self._modes:
            self._modes[0].events = self._modes[1].events = self.per_batch.setdefault(idx, [])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(None, None, None)
        self._modes = []


def _frame_batches(n: int, batch_size: int) -> DataLoader:
    """uint8 canvases + valid sizes, as the loader ships them with ``data.augment_on=gpu``."""
    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "frames": torch.randint(0, 256, (batch_size, 3, 40, 56), generator=g, dtype=torch.uint8),
            "frame_hw": torch.tensor([[40, 53], [40, 50], [40, 40], [32, 56]][:batch_size]),
            "source": torch.zeros(batch_size, dtype=torch.long),
            "key": [""] * batch_size,
        }
        for _ in range(n)
    ]
    return DataLoader(batches, batch_size=None)


def _dinov2() -> dict:
    cfg = tiny_dino()
    cfg["loss"] = {**cfg["loss"], "centering": "sinkhorn_knopp", "koleo_weight": 0.1}
    return cfg


@pytest.mark.parametrize("variant", ["dino", "dinov2_koleo_sinkhorn", "gpu_augment"])
def test_no_host_read_outside_the_logging_steps(tmp_path, monkeypatch, variant: str) -> None:
    torch.manual_seed(0)
    monkeypatch.setattr(module_lib, "use_fused_adamw", lambda *args: True)  # the CUDA default (see module doc)
    batches = 7
    model = DINOModule(
        TINY_BACKBONE,
        _dinov2() if variant.startswith("dinov2") else tiny_dino(),
        batch_size=4,
        diagnostics_every_n_steps=LOG_EVERY,
    )
    model._agreement = StepAgreement(pipelined=True)
    counter, bar = HostReadCounter(), LoggingStepProgressBar()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=pl.loggers.CSVLogger(tmp_path),
        log_every_n_steps=LOG_EVERY,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[counter, bar, ThroughputMonitor()],
        default_root_dir=tmp_path,
    )
    data = _frame_batches(batches, 4) if variant == "gpu_augment" else crop_batches(batches, batch_size=4)
    trainer.fit(model, train_dataloaders=data)
    assert trainer.optimizers[0].defaults["fused"]

    logging_steps = {i for i in range(batches) if (i + 1) % LOG_EVERY == 0}  # optimizer steps 3 and 6
    outside = {i: e for i, e in counter.per_batch.items() if i not in logging_steps and i < batches - 1}
    assert sorted(outside) == [1, 3, 4]  # (the last batch: the end of the epoch reads, by design)
    assert all(not events for events in outside.values()), outside
    # the logging steps do read (Lightning's .item() of the written metrics): the counter sees what it counts
    assert all(counter.per_batch[i] for i in logging_steps)
    assert "train/loss=" in bar.train_progress_bar.postfix and "train/lr" in trainer.logged_metrics
    assert "perf/images_per_s" in trainer.logged_metrics

"""Runs a few DINO optimizer steps with 1 or N CPU processes (Lightning DDP over gloo) on fixed data, then
saves each rank's student/teacher/center to ``<out>/rank<r>.pt``.

With N ranks each rank takes its slice of the same global batch, so N x b must reproduce 1 x (N b).
Run: python ddp_step.py OUT DEVICES PER_RANK_BATCH STEPS
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support.tiny_training import tiny_dino  # noqa: E402
from surgenet_ssl.training.module import DINOModule  # noqa: E402

BACKBONE = {"name": "timm", "timm_name": "test_vit", "drop_path_rate": 0.0}  # LayerNorm only: no batch statistics


class GradRecorder(pl.Callback):
    """Keeps the gradients the optimizer is about to apply at step 0 (after all-reduce, unscale and clipping)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:
            self.grads = {
                n: p.grad.detach().clone() for n, p in pl_module.student.named_parameters() if p.grad is not None
            }


class LossRecorder(pl.Callback):
    """This rank's own loss and the ``train/loss`` Lightning shows, at every step."""

    def __init__(self) -> None:
        self.local: list[float] = []
        self.shown: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.local.append(float(outputs["loss"]))
        self.shown.append(float(trainer.callback_metrics["train/loss"]))


class SlicedData(pl.LightningDataModule):
    def __init__(self, global_batch: int, steps: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.steps = [
            [torch.randn(global_batch, 3, 32, 32, generator=g) for _ in range(2)]
            + [torch.randn(global_batch, 3, 16, 16, generator=g) for _ in range(2)]
            for _ in range(steps)
        ]

    def train_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        batches = []
        for crops in self.steps:
            b = crops[0].shape[0] // world
            batches.append({"crops": [c[rank * b : (rank + 1) * b] for c in crops]})
        return DataLoader(batches, batch_size=None, shuffle=False)


def main() -> None:
    out, devices, per_rank, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    pl.seed_everything(0)
    dino = tiny_dino()
    dino["optimizer"].update(warmup_epochs=0, base_lr=0.05, freeze_last_layer=0)
    model = DINOModule(BACKBONE, dino, batch_size=per_rank)
    recorder, losses = GradRecorder(), LossRecorder()
    trainer = pl.Trainer(
        callbacks=[recorder, losses],
        log_every_n_steps=1,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        use_distributed_sampler=False,  # each rank slices the batch itself
    )
    trainer.fit(model, datamodule=SlicedData(per_rank * devices, steps))
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "student": model.student.state_dict(),
            "teacher": model.teacher.state_dict(),
            "center": model.dino_loss.center,
            "grads": recorder.grads,
            "local_loss": losses.local,
            "shown_loss": losses.shown,
            "global_step": trainer.global_step,
            "world": trainer.world_size,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()

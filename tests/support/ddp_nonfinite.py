"""Two CPU ranks (Lightning DDP over gloo); rank 1's loss turns non-finite at optimizer step 2. Each rank writes
what stopped it to ``<out>/rank<r>.txt``: both must stop at that step with the message, none may hang.
Run: python ddp_nonfinite.py OUT"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support.tiny_training import TINY_BACKBONE, crop_batches, tiny_dino  # noqa: E402
from surgenet_ssl.training.module import DINOModule  # noqa: E402


class PerRankData(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank
        return crop_batches(4, batch_size=2, seed=rank, nan_at=2 if rank == 1 else None)


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0)
    model = DINOModule(TINY_BACKBONE, tiny_dino(), batch_size=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        use_distributed_sampler=False,
    )
    try:
        trainer.fit(model, datamodule=PerRankData())
        result = f"finished at step {trainer.global_step}"
    except FloatingPointError as err:
        result = f"stopped at step {trainer.global_step}: {err}"
    (out / f"rank{trainer.global_rank}.txt").write_text(result)


if __name__ == "__main__":
    main()

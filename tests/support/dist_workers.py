"""Worker functions for tests that spawn real processes (they must be importable by the spawned children)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from surgenet_ssl.dino.loss import DINOLoss


def center_worker(rank: int, port: int, queue) -> None:
    """Each rank feeds a different teacher mean; the center must be the 0.1 x the global (all-reduced) mean."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    loss_fn = DINOLoss(out_dim=2)
    teacher = torch.full((2, 2), float(rank * 10))  # rank 0 mean 0, rank 1 mean 10
    loss_fn(torch.zeros(2, 2), teacher, 0.04)
    loss_fn.update_center()
    queue.put((rank, loss_fn.center.tolist()))
    dist.destroy_process_group()

"""Spawned gloo ranks for the DINOv2-option tests (importable by the children)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from surgenet_ssl.dino.dinov2 import IBOTPatchLoss, sinkhorn_knopp


def rank_rows(rank: int) -> torch.Tensor:
    """Rank 0 holds 3 teacher rows, rank 1 holds 5 (iBOT: masked patches differ per rank)."""
    torch.manual_seed(0)
    rows = torch.randn(8, 6) * 3
    return rows[:3] if rank == 0 else rows[3:]


def sinkhorn_worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    rows = rank_rows(rank)
    targets = sinkhorn_knopp(rows, 0.1)
    ibot = IBOTPatchLoss(6, center_momentum=0.9)
    ibot.teacher_targets(rows, 0.1)
    ibot.update_center()
    queue.put((rank, targets.tolist(), ibot.center.tolist()))
    dist.destroy_process_group()

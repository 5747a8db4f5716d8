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


def randomness_worker(rank: int, port: int, queue) -> None:
    """One rank's iBOT masks (mask_rng of seed 7, step 3) and drop-path mask after the per-rank seeding, drawn twice
    (the second time from scratch: reproducible), all-gathered over gloo."""
    import random

    from timm.layers import DropPath

    from surgenet_ssl.dino.dinov2 import block_masks, mask_rng, seed_rank_streams

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    draws = []
    for _ in range(2):
        torch.manual_seed(7)
        random.seed(7)  # what seed_everything(7) leaves on every rank
        masks = block_masks(8, (8, 8), 0.5, (0.1, 0.5), mask_rng(7, 3, 0, dist.get_rank())).masks
        seed_rank_streams(7, dist.get_rank())
        drop = DropPath(0.5).train()(torch.ones(16, 1, 1))
        draws.append(torch.cat([masks.flatten().float(), drop.flatten()]))
    gathered = [torch.zeros_like(draws[0]) for _ in range(2)]
    dist.all_gather(gathered, draws[0])
    queue.put((rank, [g.tolist() for g in gathered], bool(torch.equal(draws[0], draws[1]))))
    dist.destroy_process_group()

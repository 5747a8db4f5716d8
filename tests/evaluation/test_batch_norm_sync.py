"""The step-0 k-NN baseline calibrates BatchNorm on rank 0 alone: with ``trainer=gpu`` the backbone's BatchNorms are
SyncBatchNorm, whose train-mode pass is a collective the other ranks never join (NCCL hangs; on CPU tensors it
refuses). The calibration runs on a plain-BatchNorm copy: tested on 2 gloo ranks where only rank 0 calibrates."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from surgenet_ssl.evaluation import calibrate_batch_norm


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(4 * 7 * 7))


def _images() -> torch.Tensor:
    return torch.randn(8, 3, 9, 9, generator=torch.Generator().manual_seed(1))


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(_net())
        if rank == 0:  # as KNNMonitor.on_train_start: rank 0 alone, the others wait at a barrier
            images = _images()
            calibrated, n = calibrate_batch_norm(net, [images[:4], images[4:]])
            assert n == 2 and not any(isinstance(m, nn.SyncBatchNorm) for m in calibrated.modules())
            assert any(isinstance(m, nn.SyncBatchNorm) for m in net.modules())  # the model itself is unchanged
            with torch.no_grad():
                torch.save(calibrated(images), out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_sync_batch_norm_is_calibrated_on_one_rank_without_a_collective(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "features.pt"
    mp.spawn(_rank, args=(port, str(out)), nprocs=2, join=True)
    images = _images()
    plain, n = calibrate_batch_norm(_net(), [images[:4], images[4:]])  # the same network without SyncBatchNorm
    with torch.no_grad():
        torch.testing.assert_close(torch.load(out), plain(images))

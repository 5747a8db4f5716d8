"""BatchNorm statistics of an untrained network: estimate them on the evaluation images before scoring it.

Why: a BatchNorm layer that never saw data normalises with running mean 0 and variance 1, so an untrained network
in eval mode computes features that are scaled arbitrarily layer by layer, and its k-NN score is not "the network at
random init" but that plus broken normalisation. During DINO training the teacher's BatchNorm statistics follow the
training crops from its first forward passes on, so a k-NN "rise" over such a step-0 baseline is partly the
statistics being estimated, not learning (measured on the demo data with timm ``test_resnet``, 3 init seeds:
0.63-0.80 with fresh statistics, 0.83-0.90 with estimated ones). Backbones without BatchNorm (CaFormer, ConvNeXt(V2),
PVTv2, ViT: LayerNorm / GroupNorm) are returned unchanged; so are networks whose statistics were ever updated.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["uncalibrated_batch_norms", "calibrate_batch_norm"]


def uncalibrated_batch_norms(model: nn.Module) -> list[str]:
    """Names of the BatchNorm layers with running statistics that were never updated (``num_batches_tracked`` 0)."""
    return [
        name
        for name, layer in model.named_modules()
        if isinstance(layer, _BatchNorm)
        and layer.track_running_stats
        and layer.num_batches_tracked is not None
        and int(layer.num_batches_tracked) == 0
    ]


class _PlainBatchNorm(_BatchNorm):
    """A SyncBatchNorm's parameters and statistics as a local BatchNorm for inputs of any rank (N, C, ...)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions, got {input.dim()}")


def _without_sync(model: nn.Module) -> nn.Module:
    """``model`` (a copy) with its SyncBatchNorm layers as local BatchNorms: with ``trainer=gpu`` BatchNorm backbones
    become SyncBatchNorm, and a train-mode pass on one rank (the k-NN baseline runs on rank 0 alone) would start
    a collective the other ranks never join (NCCL hangs until its timeout)."""
    if isinstance(model, nn.SyncBatchNorm):
        plain = _PlainBatchNorm(model.num_features, model.eps, model.momentum, model.affine, model.track_running_stats)
        plain.load_state_dict(model.state_dict())
        return plain.to(next(iter(model.state_dict().values()), torch.zeros(())).device).train(model.training)
    for name, child in model.named_children():
        setattr(model, name, _without_sync(child))
    return model


@torch.no_grad()
def calibrate_batch_norm(
    model: nn.Module, batches: Iterable[Tensor], device: torch.device | str | None = None
) -> tuple[nn.Module, int]:
    """``(model, 0)`` when nothing needs it; else ``(copy, n)``: a copy of ``model`` whose ``n`` never-updated
    BatchNorm layers hold the mean and variance of their inputs over ``batches`` (cumulative average over the
    batches, not an EMA), in eval mode. Everything else (dropout, drop-path, other norms) stays in eval mode while
    the statistics are collected; the original model is not touched. Batches of a single image are skipped (train-
    mode BatchNorm cannot normalise one value per channel). SyncBatchNorm layers become local BatchNorms in the copy:
    the statistics pass runs on one rank and must not start a collective."""
    names = set(uncalibrated_batch_norms(model))
    if not names:
        return model, 0
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    calibrated = _without_sync(copy.deepcopy(model)).to(device).eval()
    layers = [layer for name, layer in calibrated.named_modules() if name in names]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        assert isinstance(layer, _BatchNorm)
        layer.reset_running_stats()
        layer.momentum = None  # cumulative moving average: every batch weighs the same
        layer.train()
    seen = 0
    for batch in batches:
        if batch.shape[0] < 2:
            continue
        calibrated(batch.to(device))
        seen += 1
    if seen == 0:
        raise ValueError(
            "Cannot estimate the BatchNorm statistics of the untrained network: no batch of at least 2 images. "
            "Give the evaluation at least 2 images (and a batch size of at least 2)."
        )
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    return calibrated.eval(), len(layers)

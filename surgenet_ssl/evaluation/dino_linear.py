"""DINO's linear evaluation protocol (``eval_linear.py`` of the DINO repository), for numbers comparable with the
linear-evaluation tables of DINO-style papers.

The protocol: a frozen backbone in eval mode; for a ViT the input of the linear layer is the CLS token of each of
the last ``n_last_blocks`` blocks (each after the final norm) concatenated, optionally with the mean patch token of
the last block (DINO: n=4 for ViT-S, n=1 + avgpool for ViT-B); other backbones give their pooled features. One
``nn.Linear`` (weights N(0, 0.01), bias 0) is trained with cross-entropy by SGD (momentum 0.9, no weight decay) at
``lr x batch / 256``, cosine-annealed to 0 per epoch, on random-resized crops with horizontal flips; the validation
images are resized and centre-cropped. The reported accuracy is the best validation top-1 over the epochs, as DINO
prints it (a model selection on the validation split: ``last_accuracy`` is the unselected one).

It differs from :mod:`.linear_probe` (standardised features + L-BFGS logistic regression), which is deterministic
and fast for comparing backbones with each other.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sized
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision import transforms

from .features import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset, resolve_device

__all__ = ["DinoLinearResult", "dino_linear_eval", "linear_input", "train_transform"]

log = logging.getLogger(__name__)


@dataclass
class DinoLinearResult:
    best_accuracy: float  # DINO's number: the best validation top-1 over the evaluated epochs
    best_epoch: int  # 1-based
    last_accuracy: float
    accuracies: dict[int, float] = field(default_factory=dict)  # epoch (1-based) -> validation top-1
    feature_dim: int = 0
    features: str = ""
    lr: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _is_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer) and getattr(model, "cls_token", None) is not None


def linear_input(model: nn.Module, images: Tensor, n_last_blocks: int = 4, avgpool: bool = False) -> Tensor:
    """The linear layer's input: ViT -> CLS tokens of the last ``n_last_blocks`` blocks (normed) concatenated
    [+ the last block's mean patch token]; any other backbone -> its pooled features ``model(images)``."""
    if not _is_vit(model):
        return model(images)
    vit: Any = model  # timm VisionTransformer: forward_intermediates is its method
    blocks = vit.forward_intermediates(
        images, indices=n_last_blocks, norm=True, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
    )
    out = torch.cat([prefix[:, 0] for _, prefix in blocks], dim=-1)
    if avgpool:
        out = torch.cat([out, blocks[-1][0].mean(dim=1)], dim=-1)
    return out


def _describe(model: nn.Module, n_last_blocks: int, avgpool: bool) -> str:
    if not _is_vit(model):
        return "pooled features (not a ViT: the concatenated CLS tokens apply to ViTs only)"
    return f"CLS tokens of the last {n_last_blocks} block(s) concatenated" + (
        " + mean patch token of the last block" if avgpool else ""
    )


def train_transform(image_size: int) -> transforms.Compose:
    """eval_linear.py's training augmentation: RandomResizedCrop (scale 0.08-1) + horizontal flip, ImageNet norm."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


@torch.no_grad()
def _features(model, loader, device, n_last_blocks, avgpool) -> tuple[Tensor, Tensor]:
    feats, labels = [], []
    for images, y, ok in loader:
        if not ok.any():
            continue
        feats.append(linear_input(model, images[ok].to(device), n_last_blocks, avgpool).float())
        labels.append(y[ok].to(device))
    return torch.cat(feats), torch.cat(labels)


def dino_linear_eval(
    model: nn.Module,
    train_set: ImageFolderDataset,
    val_set: ImageFolderDataset,
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 0.001,
    n_last_blocks: int = 4,
    avgpool: bool = False,
    val_every: int = 1,
    num_workers: int = 0,
    device: str | torch.device | None = "auto",
    seed: int = 0,
) -> DinoLinearResult:
    """Train DINO's linear classifier on the frozen ``model`` and return the validation accuracies.

    ``lr`` is DINO's base learning rate for a batch of 256 (scaled by ``batch_size / 256``). The validation
    features are extracted once (the backbone is frozen and the transform deterministic); the training images are
    augmented and passed through the backbone every epoch. Undecodable images are skipped.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"dino_linear needs epochs >= 1 and batch_size >= 1; got {epochs} and {batch_size}.")
    depth = len(cast(Sized, getattr(model, "blocks", ())))
    if _is_vit(model) and not 1 <= n_last_blocks <= depth:
        raise ValueError(f"dino_linear.n_last_blocks={n_last_blocks}: the ViT has {depth} blocks.")
    device = resolve_device(device)
    torch.manual_seed(seed)
    was_training = model.training
    model = model.to(device).eval()
    augmented = copy.copy(train_set)
    augmented.transform = train_transform(train_set.image_size)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(
        augmented, batch_size=batch_size, shuffle=True, num_workers=num_workers, generator=generator, drop_last=False
    )
    val_loader = DataLoader(val_set, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    try:
        val_x, val_y = _features(model, val_loader, device, n_last_blocks, avgpool)
        linear = nn.Linear(val_x.shape[1], num_classes).to(device)
        linear.weight.data.normal_(mean=0.0, std=0.01)
        linear.bias.data.zero_()
        scaled_lr = lr * batch_size / 256.0
        optimizer = torch.optim.SGD(linear.parameters(), lr=scaled_lr, momentum=0.9, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
        accuracies: dict[int, float] = {}
        for epoch in range(1, epochs + 1):
            linear.train()
            for images, y, ok in train_loader:
                if not ok.any():
                    continue
                with torch.no_grad():
                    x = linear_input(model, images[ok].to(device), n_last_blocks, avgpool).float()
                loss = nn.functional.cross_entropy(linear(x), y[ok].to(device))
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"dino_linear: loss {loss.item()} at epoch {epoch}; lower dino_linear.lr")
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            scheduler.step()
            if epoch % max(1, val_every) == 0 or epoch == epochs:
                linear.eval()
                with torch.no_grad():
                    accuracies[epoch] = float((linear(val_x).argmax(1) == val_y).float().mean())
                log.info("dino_linear epoch %d/%d: val top-1 %.4f", epoch, epochs, accuracies[epoch])
    finally:
        model.train(was_training)
    best_epoch = max(accuracies, key=lambda e: (accuracies[e], -e))  # the first epoch reaching the best
    return DinoLinearResult(
        best_accuracy=accuracies[best_epoch],
        best_epoch=best_epoch,
        last_accuracy=accuracies[epochs],
        accuracies=accuracies,
        feature_dim=int(val_x.shape[1]),
        features=_describe(model, n_last_blocks, avgpool),
        lr=scaled_lr,
    )

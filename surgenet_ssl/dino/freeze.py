"""Keep the student's backbone frozen for the first epochs of continued pretraining (fresh head warm-up)."""

from __future__ import annotations

from torch import nn


def cancel_backbone_gradients(model: nn.Module, epoch: int, freeze_epochs: int) -> bool:
    """Drop the gradients of ``model.backbone`` during the first ``freeze_epochs`` epochs (``epoch`` counts from 0).

    Like the last-layer freezing of the recipe, ``grad = None`` (not zero) makes AdamW skip the parameters entirely,
    weight decay included, so the backbone does not move; the teacher's EMA of an unchanged student backbone stays
    where it is. BatchNorm running statistics (the SurgeNet backbones have none) still update. Returns True when
    gradients were cancelled.
    """
    if epoch >= freeze_epochs:
        return False
    for p in model.get_submodule("backbone").parameters():
        p.grad = None
    return True

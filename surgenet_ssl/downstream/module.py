"""LightningModule for downstream fine-tuning: FPN segmentation and frame classification (single / multi-label).

The recipe (``configs/finetune.yaml`` ``optim.*``): AdamW with two parameter groups per learning rate (no weight
decay on biases and norms), the backbone at ``lr x backbone_lr_mult``, a linear warmup then a poly or cosine
decay per optimizer step. ``mode=linear`` freezes the backbone (and keeps its norms in eval mode): only the
classifier / decoder learns.

Validation accumulates a confusion matrix (or scores for AP) and logs the task metrics every validation epoch;
under DDP the matrices are summed over ranks. The final numbers of a run come from :func:`evaluate_model`, one
pass over the whole validation split in one process (no DistributedSampler padding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .metrics import (
    classification_metrics,
    confusion_matrix,
    multilabel_metrics,
    per_image_dice,
    per_image_dice_summary,
    phase_metrics,
    segmentation_metrics,
    video_order,
)

__all__ = ["FinetuneModule", "evaluate_model", "lr_factor", "backbone_parameters"]


def lr_factor(
    step: int, total: int, warmup: int, schedule: str = "poly", power: float = 0.9, min_ratio: float = 0.0
) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based) of ``total``: linear warmup over ``warmup``
    steps (from 1/warmup), then ``poly`` ((1 - t)^power) or ``cosine`` decay to ``min_ratio``; ``constant`` keeps 1."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    t = min(1.0, max(0.0, (step - warmup) / span))
    if schedule == "poly":
        decay = (1.0 - t) ** power
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        raise ValueError(f"optim.schedule must be poly, cosine or constant; got {schedule!r}")
    return min_ratio + (1.0 - min_ratio) * decay


def _classifier_head(model: nn.Module) -> Any:
    """A timm classifier's head: ``get_classifier()`` is timm's method, which nn.Module does not declare."""
    timm_model: Any = model
    return timm_model.get_classifier()


def backbone_parameters(model: nn.Module, task: str) -> set[int]:
    """ids of the backbone's parameters: the FPN's ``encoder``; for a timm classifier everything but its head."""
    if task == "segmentation":
        return {id(p) for p in model.get_submodule("encoder").parameters()}
    head = _classifier_head(model)
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    return {id(p) for p in model.parameters() if id(p) not in head_ids}


class FinetuneModule(pl.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        task: str,
        class_names: Sequence[str],
        multilabel: bool = False,
        mode: str = "full",
        optim: dict | None = None,
        ignore_index: int = 255,
        steps_per_epoch: int | None = None,
    ):
        super().__init__()
        if task not in ("segmentation", "classification"):
            raise ValueError(f"task must be segmentation or classification, got {task!r}")
        if mode not in ("full", "linear"):
            raise ValueError(f"task.mode must be full or linear, got {mode!r}")
        self.model = model
        self.task, self.mode, self.multilabel = task, mode, multilabel
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.optim = {
            "lr": 1e-4,
            "backbone_lr_mult": 0.1,
            "weight_decay": 0.05,
            "schedule": "poly",
            "poly_power": 0.9,
            "warmup_epochs": 1.0,
            "min_lr_ratio": 0.0,
            "betas": [0.9, 0.999],
            **(optim or {}),
        }
        self.ignore_index = ignore_index
        self.steps_per_epoch = steps_per_epoch
        self._backbone_ids = backbone_parameters(model, task)
        if mode == "linear":
            for p in model.parameters():
                if id(p) in self._backbone_ids:
                    p.requires_grad_(False)
        self._reset_val()

    # ------------------------------------------------------------------ model
    def _trainable_head(self) -> nn.Module:
        return self.model.get_submodule("decoder") if self.task == "segmentation" else _classifier_head(self.model)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.mode == "linear":  # frozen backbone: its norms and dropout stay in inference mode
            self.model.eval()
            self._trainable_head().train()
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits, target.float())
        if self.task == "segmentation":
            return F.cross_entropy(logits, target, ignore_index=self.ignore_index)
        return F.cross_entropy(logits, target)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        loss = self.loss(self(x), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"fine-tuning loss is {loss.item()} at step {self.global_step}: lower optim.lr")
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        opt = self.optimizers()
        if opt is not None and not isinstance(opt, list):
            # the head / decoder lr (the backbone's is optim.backbone_lr_mult times it)
            self.log(
                "train/lr", max(g["lr"] for g in opt.param_groups), on_step=True, on_epoch=False, batch_size=x.shape[0]
            )
        return loss

    # ------------------------------------------------------------ validation
    def _reset_val(self):
        self._cm = None
        self._scores: list[Tensor] = []
        self._targets: list[Tensor] = []

    def on_validation_epoch_start(self):
        self._reset_val()

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        logits = self(x)
        update_accumulators(self, logits, y)

    def on_validation_epoch_end(self):
        if self.multilabel:
            if not self._scores:
                return
            # all_gather of a tensor is a tensor
            scores = cast(Tensor, self.all_gather(torch.cat(self._scores))).reshape(-1, self.num_classes)
            targets = cast(Tensor, self.all_gather(torch.cat(self._targets))).reshape(-1, self.num_classes)
            metrics = multilabel_metrics(scores.float().cpu(), targets.float().cpu(), self.class_names)
            values = {"val/mAP": metrics["mAP"]} | {f"val/ap/{k}": v for k, v in metrics["ap"].items()}
        else:
            if self._cm is None:
                return
            cm = self.trainer.strategy.reduce(self._cm.clone(), reduce_op="sum")
            if self.task == "segmentation":
                metrics = segmentation_metrics(cm, self.class_names)
                values = {"val/mIoU": metrics["mIoU"], "val/mDice": metrics["mDice"]}
                values |= {f"val/iou/{k}": v for k, v in metrics["iou"].items()}
            else:
                metrics = classification_metrics(cm, self.class_names)
                values = {"val/accuracy": metrics["accuracy"], "val/macro_f1": metrics["macro_f1"]}
                values |= {f"val/f1/{k}": v for k, v in metrics["f1"].items()}
        values = {k: float(v) for k, v in values.items() if v == v}  # undefined (nan: class absent) is not logged
        self.log_dict(values, sync_dist=False)
        self._reset_val()

    # ------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        o = self.optim
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            is_backbone = id(p) in self._backbone_ids
            no_decay = p.ndim <= 1 or name.endswith(".bias")
            groups.setdefault((is_backbone, no_decay), []).append(p)
        param_groups = [
            {
                "params": params,
                "lr": o["lr"] * (o["backbone_lr_mult"] if bb else 1.0),
                "weight_decay": 0.0 if nd else o["weight_decay"],
                "name": ("backbone" if bb else "head") + ("_no_decay" if nd else ""),
            }
            for (bb, nd), params in sorted(groups.items())
        ]
        optimizer = torch.optim.AdamW(param_groups, lr=o["lr"], betas=tuple(o["betas"]))
        total = int(self.trainer.estimated_stepping_batches)
        per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        warmup = int(round(float(o["warmup_epochs"]) * per_epoch))
        warmup = min(warmup, max(0, total - 1))
        power, min_ratio = float(o["poly_power"]), float(o["min_lr_ratio"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, total, warmup, o["schedule"], power, min_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def update_accumulators(owner, logits: Tensor, y) -> None:
    """Add a batch to ``owner._cm`` / ``_scores`` (segmentation: logits upsampled to each original-size mask)."""
    if owner.multilabel:
        owner._scores.append(torch.sigmoid(logits.float()).detach())
        owner._targets.append(y.float().detach())
        return
    if owner.task == "segmentation":
        masks = y if isinstance(y, (list, tuple)) else list(y)
        cm = None
        for logit, mask in zip(logits, masks, strict=True):
            if logit.shape[-2:] != mask.shape[-2:]:
                logit = F.interpolate(logit[None].float(), size=mask.shape[-2:], mode="bilinear", align_corners=False)[
                    0
                ]
            part = confusion_matrix(logit.argmax(0), mask.to(logit.device), owner.num_classes, owner.ignore_index)
            if getattr(owner, "_image_dice", None) is not None:
                owner._image_dice.append(per_image_dice(part))
            cm = part if cm is None else cm + part
    else:
        cm = confusion_matrix(logits.argmax(1), y, owner.num_classes, ignore_index=None)
    owner._cm = cm if owner._cm is None else owner._cm + cm


class _Accumulator:
    def __init__(self, task, num_classes, multilabel, ignore_index, per_image: bool = False):
        self.task, self.num_classes, self.multilabel, self.ignore_index = task, num_classes, multilabel, ignore_index
        self._cm: Tensor | None = None
        self._scores: list[Tensor] = []
        self._targets: list[Tensor] = []
        self._image_dice: list | None = [] if per_image else None


def _per_video(preds: dict[int, int], targets: dict[int, int], options: dict, class_names: Sequence[str]) -> dict:
    """Phase metrics per video (Cholec80) of the frames whose dataset index has a prediction."""
    videos, keys = options["videos"], options["keys"]
    seen = sorted(preds)
    order = [seen[i] for i in video_order([keys[i] for i in seen], [videos[i] for i in seen])]
    return phase_metrics(
        [preds[i] for i in order],
        [targets[i] for i in order],
        [str(videos[i]) for i in order],
        class_names,
        fps=float(options.get("fps", 1.0)),
        boundary_seconds=float(options.get("boundary_seconds", 10.0)),
    )


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader,
    task: str,
    class_names: Sequence[str],
    multilabel: bool,
    device: torch.device,
    ignore_index: int = 255,
    autocast_dtype: torch.dtype | None = None,
    keep: Sequence[int] = (),
    options: dict | None = None,
) -> tuple[dict, list]:
    """One pass over ``loader`` -> the task metrics; also returns the (index, prediction) pairs of the dataset
    indices in ``keep`` (segmentation: the class map at the mask's resolution) for overlay figures.

    ``options`` (the ``metrics`` config): ``absent_labels`` (mAP), ``per_image_dice``; ``videos`` and ``keys`` (per
    dataset index: video id and file name) with ``fps`` and ``boundary_seconds`` add the per-video phase metrics.
    """
    options = options or {}
    keep_ids = {int(i) for i in keep}
    acc = _Accumulator(task, len(class_names), multilabel, ignore_index, bool(options.get("per_image_dice")))
    per_video = task == "classification" and not multilabel and options.get("videos") is not None
    preds: dict[int, int] = {}
    targets: dict[int, int] = {}
    was_training = model.training
    model.eval().to(device)
    kept: list = []
    try:
        for x, y, idx in loader:
            x = x.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(x)
            logits = logits.float()
            if isinstance(y, (list, tuple)):
                y = [m.to(device) for m in y]
            else:
                y = y.to(device)
            update_accumulators(acc, logits, y)
            if per_video:
                preds.update(zip(idx.tolist(), logits.argmax(1).tolist(), strict=True))
                targets.update(zip(idx.tolist(), y.tolist(), strict=True))
            if task == "segmentation" and keep_ids:
                for logit, mask, i in zip(logits, y, idx.tolist(), strict=True):
                    if i not in keep_ids:
                        continue
                    up = F.interpolate(logit[None], size=mask.shape[-2:], mode="bilinear", align_corners=False)[0]
                    kept.append((i, up.argmax(0).cpu()))
    finally:
        model.train(was_training)
    if multilabel:
        if not acc._scores:
            raise ValueError("Empty split: the validation loader yielded no samples.")
        scores, labels = torch.cat(acc._scores).cpu(), torch.cat(acc._targets).cpu()
        return multilabel_metrics(scores, labels, class_names, str(options.get("absent_labels", "zero"))), kept
    if acc._cm is None:
        raise ValueError("Empty split: the validation loader yielded no samples.")
    cm = acc._cm.cpu()
    score = segmentation_metrics if task == "segmentation" else classification_metrics
    metrics = score(cm, class_names)
    if acc._image_dice is not None:
        metrics |= per_image_dice_summary(np.stack(acc._image_dice), class_names)
    if per_video:
        metrics["per_video"] = _per_video(preds, targets, options, class_names)
    metrics["confusion_matrix"] = cm.tolist()
    return metrics, kept

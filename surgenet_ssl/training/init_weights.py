"""Continue pretraining from existing weights (``backbone.init_weights=<path>``): domain-adaptive DINO.

Student and teacher start from the same weights, read through the one never-silent loader
(:func:`surgenet_ssl.models.load_backbone_weights`): a published SurgeNet teacher ``.pth``, a timm ``.safetensors``,
a full DINO checkpoint (our ``*_checkpoint.pth`` export or the official DINO layout) or a Lightning checkpoint of
another run. A backbone tensor that is missing, unexpected or mis-shaped is an error naming the tensors.

When the file also holds the DINO head and center (full DINO and Lightning checkpoints), they are loaded too
(``backbone.init_head=true``, the default): the teacher's head into both student and teacher, and the center into
the loss. A head of another shape (different ``dino.out_dim`` / ``dino.head.*``) is an error that names the fix
(``backbone.init_head=false`` starts a fresh head on the loaded backbone).

The backbone can be kept frozen for the first ``backbone.freeze_epochs`` epochs while the fresh head warms up
(:func:`surgenet_ssl.dino.freeze.cancel_backbone_gradients`).

Applied once, at the start of a fresh run: a run that resumes from a checkpoint in its run dir keeps the resumed
state (the init file is not even read).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from surgenet_ssl.models.weights import LoadReport, WeightSource, load_backbone_weights, read_state_dict

__all__ = ["INIT_KEYS", "InitReport", "dino_head_and_center", "initialize_dino"]

log = logging.getLogger(__name__)

#: ``backbone.*`` config keys that are training options, not architecture arguments of ``build_backbone``.
INIT_KEYS = ("init_weights", "init_head", "freeze_epochs")


@dataclass
class InitReport:
    """What :func:`initialize_dino` loaded; ``str(report)`` is the log line."""

    source: str
    backbone: LoadReport
    head_tensors: int = 0  # DINO head tensors loaded into student and teacher (0: fresh head)
    center: bool = False  # the DINO center was loaded
    head_note: str = ""
    mask_token: str = ""  # what became of an official DINOv2 file's iBOT mask token ("" : the file has none)

    def __str__(self) -> str:
        head = f"{self.head_tensors} DINO head tensors" if self.head_tensors else f"fresh DINO head{self.head_note}"
        center = "center loaded" if self.center else "fresh center"
        extra = "".join(f", {n}" for n in (self.backbone.resampled, self.mask_token) if n)
        return (
            f"init_weights: student and teacher start from {self.source}: {self.backbone.loaded} backbone "
            f"tensors ({self.backbone.format}), {head}, {center}{extra}."
        )


def _strip(sd: Mapping[str, Any], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix) and isinstance(v, Tensor)}


def _unwrap_module(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop a DDP ``module.`` prefix carried by every key (the official DINO student is saved from DDP)."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def dino_head_and_center(obj: Mapping[str, Any]) -> tuple[dict[str, Tensor] | None, Tensor | None, str]:
    """The teacher's DINO head (names relative to the head) and the center of a checkpoint dict, when it has them.

    Full DINO checkpoints (``teacher``: ``backbone.*`` + ``head.*``, ``dino_loss``: ``{"center"}``) and Lightning
    checkpoints of this package (``state_dict``: ``teacher.head.*``, ``dino_loss.center``) are understood; for any
    other file (a bare backbone) both are ``None``. The third value names where they came from.
    """
    state = obj.get("state_dict")
    if isinstance(state, Mapping) and any(str(k).startswith("teacher.") for k in state):
        head = _strip(state, "teacher.head.")
        center = state.get("dino_loss.center")
        return head or None, center if isinstance(center, Tensor) else None, "Lightning checkpoint"
    teacher = obj.get("teacher")
    if isinstance(teacher, Mapping):
        tensors = _unwrap_module({k: v for k, v in teacher.items() if isinstance(v, Tensor)})
        head = _strip(tensors, "head.") or _strip(tensors, "dino_head.")  # DINO / DINOv2 naming
        loss = obj.get("dino_loss")
        center = loss.get("center") if isinstance(loss, Mapping) else obj.get("dino_loss.center")
        return head or None, center if isinstance(center, Tensor) else None, "full DINO checkpoint"
    return None, None, "backbone weights"


def _check_head(head: dict[str, Tensor], target: nn.Module, source: str) -> None:
    own = target.state_dict()
    missing = sorted(set(own) - set(head))
    unexpected = sorted(set(head) - set(own))
    wrong = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in head.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"the DINO head in {source} does not match this run's head (dino.out_dim / dino.head.*): "
            f"{len(missing)} missing {missing[:6]}, {len(unexpected)} unexpected {unexpected[:6]}, {len(wrong)} "
            f"mis-shaped {wrong[:6]}. Set dino.out_dim / dino.head.* to the values the file was trained with, or "
            "backbone.init_head=false to start a fresh head on the loaded backbone."
        )


class BackboneAndHead(Protocol):
    """What :func:`initialize_dino` needs of the student and of the teacher (a ``MultiCropWrapper``)."""

    backbone: nn.Module
    head: nn.Module


@torch.no_grad()
def initialize_dino(
    student: BackboneAndHead,
    teacher: BackboneAndHead,
    source: WeightSource,
    backbone: str,
    center: Tensor | None = None,
    load_head: bool = True,
) -> InitReport:
    """Load ``source`` into a student/teacher pair (``.backbone`` and ``.head`` each) and, optionally, the center.

    The backbone goes through :func:`load_backbone_weights` (strict: any mismatch raises) into the student, then
    is copied into the teacher, so both start identical (the teacher of the file, where the file has one). With
    ``load_head`` the file's teacher head (if any) goes into both heads and its center into ``center`` in place.
    """
    name = "<state dict>" if isinstance(source, Mapping) else os.fspath(source)
    obj = read_state_dict(source)
    report = load_backbone_weights(student.backbone, obj, backbone, source_name=name)
    teacher.backbone.load_state_dict(student.backbone.state_dict())
    result = InitReport(name, report)
    result.mask_token = _place_mask_token(student, teacher, report.mask_token)
    head, saved_center, kind = dino_head_and_center(obj)
    if not load_head:
        result.head_note = " (backbone.init_head=false)" if head is not None else ""
        return _logged(result)
    if head is not None:
        _check_head(head, student.head, name)
        student.head.load_state_dict(head)
        teacher.head.load_state_dict(head)
        result.head_tensors = len(head)
    else:
        result.head_note = f" (the file holds {kind} only)"
    if saved_center is not None and center is not None and head is not None:
        if saved_center.numel() != center.numel():
            raise ValueError(
                f"the DINO center in {name} has {saved_center.numel()} entries but dino.out_dim is "
                f"{center.numel()}; set backbone.init_head=false to start fresh."
            )
        center.copy_(saved_center.reshape(center.shape).to(center))
        result.center = True
    return _logged(result)


def _place_mask_token(student: BackboneAndHead, teacher: BackboneAndHead, token: Tensor | None) -> str:
    """An official DINOv2 backbone's iBOT mask token goes where the iBOT step reads it: the wrappers' ``mask_token``
    (student and teacher, as the backbone); without the iBOT loss (``dino.loss.ibot_weight=0``) it has no use."""
    if token is None:
        return ""
    own = getattr(student, "mask_token", None)
    if not isinstance(own, Tensor):
        return "mask_token unused (no iBOT loss)"
    if token.numel() != own.numel():
        raise ValueError(f"the file's mask_token has {token.numel()} values, the model's {own.numel()}")
    for wrapper in (student, teacher):
        held: Any = wrapper  # (the Protocol does not declare the iBOT mask token)
        held.mask_token.copy_(token.reshape(own.shape))
    return "mask_token loaded"


def _logged(report: InitReport) -> InitReport:
    log.info("%s", report)
    return report

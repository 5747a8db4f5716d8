"""The LightningModule that trains a DINO student/teacher pair; the algorithm itself lives in ``surgenet_ssl.dino``.

What this adds to the plain-PyTorch parts is only the wiring into Lightning's loop: schedules indexed by the
optimizer step, per-parameter clipping after AMP unscaling, last-layer freezing, and the EMA-teacher and
center updates exactly once per optimizer step (also under gradient accumulation).
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch

from surgenet_ssl.backbones import build_backbone
from surgenet_ssl.dino import (
    DINOHead,
    DINOLoss,
    MultiCropWrapper,
    cancel_last_layer_gradients,
    clip_gradients_per_parameter,
    cosine_schedule,
    param_groups,
    teacher_temp_schedule,
    update_teacher,
)
from surgenet_ssl.dino.schedules import scaled_lr
from surgenet_ssl.evaluation.diagnostics import collapse_diagnostics, collapse_warning

log = logging.getLogger(__name__)

# Config fields that must match when resuming: a different value changes what the weights or schedules mean.
RESUME_MUST_MATCH = ("backbone.name", "backbone.timm_name", "dino.out_dim", "dino.head", "dino.crops.local_number")


def _lookup(cfg: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


@torch.no_grad()
def check_crop_sizes(backbone: torch.nn.Module, name: str, crops: dict) -> None:
    """Fail at start-up, with the fix, when the backbone cannot take the configured crop sizes (e.g. a ViT with
    16-px patches and 60-px crops), instead of deep inside the first training step."""
    was_training = backbone.training
    backbone.eval()
    try:
        for key in ("global_size", "local_size"):
            size = int(crops.get(key, 0) or 0)
            if size <= 0:
                continue
            try:
                backbone(torch.zeros(1, 3, size, size))
            except Exception as err:  # timm raises AssertionError/RuntimeError/ValueError depending on the model
                raise ValueError(
                    f"backbone {name} cannot take {size}-px crops (dino.crops.{key}={size}): {err}. Choose crop sizes "
                    "the backbone supports (ViT-S/16: multiples of 16, e.g. 224 and 96)."
                ) from err
    finally:
        backbone.train(was_training)


class DINOModule(pl.LightningModule):
    """Student (backbone + head, trained) and teacher (EMA copy, no gradients) with the DINO loss.

    Args:
        backbone: the ``backbone`` config group as a dict (``name``, ``timm_name``, ``drop_path_rate``, ...).
        dino: the ``dino`` recipe config group as a dict (see ``configs/dino/default.yaml``).
        batch_size: per-device batch size, used with world size and accumulation to scale the lr.
        diagnostics_every_n_steps: how often to log collapse diagnostics (0: never).
    """

    def __init__(self, backbone: dict, dino: dict, batch_size: int, diagnostics_every_n_steps: int = 50) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone_cfg, self.dino_cfg, self.batch_size = dict(backbone), dict(dino), batch_size
        self.diagnostics_every_n_steps = diagnostics_every_n_steps
        kwargs = {k: v for k, v in self.backbone_cfg.items() if k not in ("name", "timm_name", "drop_path_rate")}
        name, timm_name = self.backbone_cfg["name"], self.backbone_cfg.get("timm_name")
        student_backbone = build_backbone(
            name, drop_path_rate=self.backbone_cfg.get("drop_path_rate", 0.0), timm_name=timm_name, **kwargs
        )
        teacher_backbone = build_backbone(name, drop_path_rate=0.0, timm_name=timm_name, **kwargs)
        embed_dim = student_backbone.num_features
        check_crop_sizes(teacher_backbone, name if name != "timm" else timm_name, self.dino_cfg.get("crops", {}))
        head_cfg = dict(self.dino_cfg.get("head", {}))
        out_dim = int(self.dino_cfg["out_dim"])
        self.student = MultiCropWrapper(student_backbone, DINOHead(embed_dim, out_dim, **head_cfg))
        self.teacher = MultiCropWrapper(teacher_backbone, DINOHead(embed_dim, out_dim, **head_cfg))
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        loss_cfg = self.dino_cfg["loss"]
        self.dino_loss = DINOLoss(
            out_dim,
            n_global_crops=2,
            student_temp=loss_cfg["student_temp"],
            center_momentum=loss_cfg["center_momentum"],
        )
        self.schedules: dict[str, torch.Tensor] = {}
        self.global_batch = batch_size

    # ----------------------------------------------------------------------------------------------------- setup
    def _steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (epoch-based warmups are converted to steps with it)."""
        total = int(self.trainer.estimated_stepping_batches)  # also loads the train dataloader
        try:
            return max(1, len(self.trainer.train_dataloader) // self.trainer.accumulate_grad_batches)
        except TypeError:  # no length known
            epochs = int(self.trainer.max_epochs or 0)
            return max(1, total // epochs) if epochs > 0 else total

    def build_schedules(self, total_steps: int, steps_per_epoch: int, global_batch: int) -> None:
        """Per-optimizer-step schedules of lr, weight decay, teacher momentum and teacher temperature."""
        opt, loss, tea = self.dino_cfg["optimizer"], self.dino_cfg["loss"], self.dino_cfg["teacher"]
        peak_lr = scaled_lr(opt["base_lr"], global_batch, opt.get("reference_batch", 256))
        self.schedules = {
            "lr": cosine_schedule(
                peak_lr, opt["min_lr"], total_steps, warmup_steps=int(opt["warmup_epochs"] * steps_per_epoch)
            ),
            "wd": cosine_schedule(opt["weight_decay"], opt["weight_decay_end"], total_steps),
            "momentum": cosine_schedule(tea["momentum"], tea["momentum_end"], total_steps),
            "teacher_temp": teacher_temp_schedule(
                loss["warmup_teacher_temp"],
                loss["teacher_temp"],
                int(loss["warmup_teacher_temp_epochs"] * steps_per_epoch),
                total_steps,
            ),
        }
        self.global_batch = global_batch
        self.peak_lr = peak_lr

    def _scheduled(self, name: str, step: int) -> float:
        values = self.schedules[name]
        return float(values[min(step, len(values) - 1)])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainer = self.trainer
        global_batch = self.batch_size * trainer.world_size * trainer.accumulate_grad_batches
        self.build_schedules(int(trainer.estimated_stepping_batches), self._steps_per_epoch(), global_batch)
        log.info(
            "global batch %d (= %d per device x %d devices x %d accumulation); peak lr %.3g; %d optimizer steps",
            global_batch, self.batch_size, trainer.world_size, trainer.accumulate_grad_batches,
            self.peak_lr, len(self.schedules["lr"]),
        )  # fmt: skip
        betas = tuple(self.dino_cfg["optimizer"].get("betas", (0.9, 0.999)))
        return torch.optim.AdamW(param_groups(self.student), lr=self.peak_lr, betas=betas)

    # -------------------------------------------------------------------------------------------------- training
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """``data.augment_on=gpu``: the loader delivers uint8 ``frames``; make the multi-crops on the device."""
        if isinstance(batch, dict) and "frames" in batch:
            if getattr(self, "_gpu_augment", None) is None:
                from surgenet_ssl.data.gpu_augment import GpuMultiCrop

                c = self.dino_cfg["crops"]
                self._gpu_augment = GpuMultiCrop(c["global_size"], c["local_size"], c["global_scale"],
                                                 c["local_scale"], c["local_number"])  # fmt: skip
                self._gpu_generator = torch.Generator(device=batch["frames"].device)  # different per rank
                self._gpu_generator.manual_seed(torch.initial_seed() + 1_000_003 * (self.global_rank + 1))
            batch = dict(batch)
            batch["crops"] = self._gpu_augment(batch.pop("frames"), generator=self._gpu_generator)
        return batch

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        crops = batch["crops"]
        step = self.global_step
        with torch.no_grad():
            teacher_out = self.teacher(crops[:2])
        student_out = self.student(crops)
        teacher_temp = self._scheduled("teacher_temp", step)
        loss = self.dino_loss(student_out, teacher_out, teacher_temp)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"DINO loss is {loss.item()} at optimizer step {step} (epoch {self.current_epoch}, batch {batch_idx}); "
                "training stopped and the last good checkpoint is untouched. Usual fixes: lower dino.optimizer.base_lr, "
                "use trainer.precision=bf16-mixed instead of 16-mixed, or a lower dino.optimizer.clip_grad."
            )
        bs = crops[0].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/teacher_temp", teacher_temp, batch_size=bs)
        every = self.diagnostics_every_n_steps
        if every and step % every == 0 and batch_idx % self.trainer.accumulate_grad_batches == 0:
            self._log_diagnostics(teacher_out, student_out, teacher_temp, bs)
        return loss

    @torch.no_grad()
    def _log_diagnostics(self, teacher_out: torch.Tensor, student_out: torch.Tensor, temp: float, bs: int) -> None:
        """Collapse diagnostics on this batch; warns (after the first epoch's warmup) when they look collapsed."""
        metrics = collapse_diagnostics(
            teacher_out.float(), student_out[: teacher_out.shape[0]].float(), center=self.dino_loss.center,
            teacher_temp=temp, student_temp=self.dino_loss.student_temp,
        )  # fmt: skip
        # Straight to the loggers (not self.log): a sparse metric must not be re-emitted with stale values.
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics({f"diag/{k}": float(v) for k, v in metrics.items()}, step=self.global_step)
        warning = collapse_warning(metrics, out_dim=teacher_out.shape[-1])
        if warning and self.current_epoch >= 1 and self.trainer.is_global_zero:
            log.warning("step %d: %s", self.global_step, warning)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Runs after AMP unscaling, so the clip threshold applies to true gradient norms.
        clip = self.dino_cfg["optimizer"].get("clip_grad", 0.0)
        if clip:
            clip_gradients_per_parameter(self.student, clip)
        cancel_last_layer_gradients(self.student, self.current_epoch, self.dino_cfg["optimizer"]["freeze_last_layer"])

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        step = self.global_step
        lr, wd = self._scheduled("lr", step), self._scheduled("wd", step)
        for group in optimizer.param_groups:
            group["lr"] = lr
            if group.get("name") == "decay":
                group["weight_decay"] = wd
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        momentum = self._scheduled("momentum", step)
        update_teacher(self.student, self.teacher, momentum)
        self.dino_loss.update_center()
        self.log_dict(
            {"train/lr": lr, "train/weight_decay": wd, "train/teacher_momentum": momentum,
             "train/global_batch": float(self.global_batch), "train/batch_per_device": float(self.batch_size)},
            batch_size=self.batch_size,
        )  # fmt: skip

    def on_train_epoch_start(self) -> None:
        loader = self.trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["global_batch"] = self.global_batch  # with global_step: frames seen, for the model card

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("hyper_parameters", {})
        current = {"backbone": self.backbone_cfg, "dino": self.dino_cfg}
        for key in RESUME_MUST_MATCH:
            old, new = _lookup(saved, key), _lookup(current, key)
            if old is not None and old != new:
                raise ValueError(
                    f"Cannot resume: the checkpoint was trained with {key}={old!r} but this run asks for {key}={new!r}. "
                    "Use a new run dir (hydra.run.dir=...) for a different backbone or recipe, or restore the old value."
                )

    def teacher_backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The teacher backbone's weights in timm naming, detached on CPU (what the exporters write)."""
        return {k: v.detach().cpu().clone() for k, v in self.teacher.backbone.state_dict().items()}

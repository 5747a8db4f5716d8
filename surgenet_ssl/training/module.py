"""The LightningModule that trains a DINO student/teacher pair; the algorithm itself lives in ``surgenet_ssl.dino``.

What this adds to the plain-PyTorch parts is only the wiring into Lightning's loop: schedules indexed by training
progress (epochs done, so a resume on another world size continues the recipe), per-parameter clipping after AMP
unscaling, last-layer freezing, and the EMA-teacher and center updates exactly once per optimizer step (also under
gradient accumulation).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, cast

import pytorch_lightning as pl
import torch

from surgenet_ssl.backbones import VIT_BACKBONES, backbone_num_features, build_backbone
from surgenet_ssl.config.checks import build_section
from surgenet_ssl.dino import (
    DINOHead,
    DINOLoss,
    MultiCropWrapper,
    cancel_last_layer_gradients,
    clip_gradients_per_module,
    clip_gradients_per_parameter,
    cosine_schedule,
    param_groups,
    teacher_temp_schedule,
    update_teacher,
)
from surgenet_ssl.dino.dinov2 import (
    IBOTPatchLoss,
    backbone_features,
    block_masks,
    is_vit,
    koleo_loss,
    mask_rng,
    seed_rank_streams,
    vit_tokens,
)
from surgenet_ssl.dino.freeze import cancel_backbone_gradients
from surgenet_ssl.dino.recipe import CropsRecipe, DinoRecipe, LossRecipe
from surgenet_ssl.dino.schedules import scaled_lr
from surgenet_ssl.evaluation.diagnostics import CollapseTracker, collapse_diagnostics
from surgenet_ssl.runtime.checkpointing import check_same_checkpoint, normalize_loop_progress
from surgenet_ssl.runtime.cluster import PREEMPTION
from surgenet_ssl.runtime.distributed import gather_from_ranks
from surgenet_ssl.runtime.performance import (
    compile_with_fallback,
    performance_options,
    to_channels_last,
    use_fused_adamw,
)
from surgenet_ssl.runtime.step_agreement import Agreement, StepAgreement
from surgenet_ssl.training.init_weights import INIT_KEYS, initialize_dino

log = logging.getLogger(__name__)

# Config fields that must match when resuming: a different value changes what the weights or schedules mean.
RESUME_MUST_MATCH = (
    "backbone.name",
    "backbone.timm_name",
    "dino.out_dim",
    "dino.head",
    "dino.ibot_head",
    "dino.crops.local_number",
)


def _lookup(cfg: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


@torch.no_grad()
def check_crop_sizes(backbone: torch.nn.Module, name: str, crops: CropsRecipe) -> None:
    """Fail at start-up, with the fix, when the backbone cannot take the configured crop sizes (e.g. a ViT with
    16-px patches and 60-px crops), instead of deep inside the first training step."""
    was_training = backbone.training
    backbone.eval()
    try:
        for key in ("global_size", "local_size"):
            size = int(getattr(crops, key))
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
        dino: the ``dino`` recipe config group as a dict (see ``surgenet_ssl/configs/dino/default.yaml``), checked into
            ``self.recipe`` (a :class:`~surgenet_ssl.dino.recipe.DinoRecipe`) at once; a ``DinoRecipe`` is also
            accepted. The hyperparameters saved in checkpoints keep the plain dict.
        batch_size: per-device batch size, used with world size and accumulation to scale the lr.
        diagnostics_every_n_steps: how often to log collapse diagnostics (0: never).
        performance: the ``performance`` config group (compile, channels_last, fused_adamw, cudnn_benchmark).
    """

    def __init__(
        self,
        backbone: dict,
        dino: dict | DinoRecipe,
        batch_size: int,
        diagnostics_every_n_steps: int = 50,
        performance: dict | None = None,
    ) -> None:
        super().__init__()
        if isinstance(dino, DinoRecipe):
            dino = dino.to_dict()  # before save_hyperparameters (it reads the arguments' current values): a plain dict
        self.save_hyperparameters()
        self.backbone_cfg, self.dino_cfg, self.batch_size = dict(backbone), dict(dino), batch_size
        self.recipe = DinoRecipe.from_dict(self.dino_cfg)  # a misspelt key or a bad value fails here, naming it
        self.diagnostics_every_n_steps = diagnostics_every_n_steps
        skip = ("name", "timm_name", "drop_path_rate", "drop_path_uniform", *INIT_KEYS)  # INIT_KEYS: on_fit_start
        kwargs = {k: v for k, v in self.backbone_cfg.items() if k not in skip}
        name, timm_name = self.backbone_cfg["name"], self.backbone_cfg.get("timm_name")
        if kwargs.get("img_size") is None:
            kwargs.pop("img_size", None)
            if name in VIT_BACKBONES:  # like the official DINO/DINOv2 training: built at the global crop size
                kwargs["img_size"] = self.recipe.crops.global_size
        uniform = bool(self.backbone_cfg.get("drop_path_uniform", False))
        if uniform and name not in VIT_BACKBONES:
            log.warning("backbone.drop_path_uniform ignored: %s is not one of the ViT backbones", name)
            uniform = False
        student_backbone = build_backbone(
            name,
            drop_path_rate=self.backbone_cfg.get("drop_path_rate", 0.0),
            timm_name=timm_name,
            drop_path_uniform=uniform,
            **kwargs,
        )
        teacher_backbone = build_backbone(name, drop_path_rate=0.0, timm_name=timm_name, **kwargs)
        embed_dim = backbone_num_features(student_backbone)
        recipe = self.recipe
        shown = str(timm_name) if name == "timm" else str(name)  # the backbone's name in messages
        check_crop_sizes(teacher_backbone, shown, recipe.crops)
        head_cfg = dataclasses.asdict(recipe.head)
        out_dim = recipe.out_dim
        self.student = MultiCropWrapper(student_backbone, DINOHead(embed_dim, out_dim, **head_cfg))
        self.teacher = MultiCropWrapper(teacher_backbone, DINOHead(embed_dim, out_dim, **head_cfg))
        loss = recipe.loss
        self._init_dinov2_options(loss, shown, embed_dim, out_dim, recipe)
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.dino_loss = DINOLoss(
            out_dim,
            n_global_crops=2,
            student_temp=loss.student_temp,
            center_momentum=loss.center_momentum,
            centering=loss.centering,
            sinkhorn_iterations=loss.sinkhorn_iterations,
        )
        self.schedules: dict[str, torch.Tensor] = {}
        self._schedule_values: dict[str, list[float]] = {}
        self.global_batch = batch_size
        # Training progress, the schedules' clock: epochs done (fractional) and samples trained on, whatever the world
        # size, batch or accumulation of the processes that did them (checkpointed; see _schedule_index).
        self.progress_epochs = 0.0
        self.samples_seen = 0
        self.steps_per_epoch = 1
        self._resumed_progress: dict[str, Any] | None = None
        self._legacy_step: int | None = None
        self.resume_checkpoint: str | None = None  # what this rank will resume from (set by the entry point)
        # Per-step agreement between ranks (surgenet_ssl/runtime/step_agreement.py) and RNG states to restore on resume.
        self._agreement = StepAgreement()
        self.stop_agreed = False
        self._rng_to_restore: dict[str, Any] | None = None
        # cfg.seed after seed_everything: the iBOT mask seeds and the per-rank streams (on_train_start) derive from it
        self._base_seed = torch.initial_seed()
        self.performance = performance_options(performance)
        if self.performance["channels_last"]:
            self.student.to(memory_format=torch.channels_last)
            self.teacher.to(memory_format=torch.channels_last)
        self._compiled = False

    def _init_dinov2_options(
        self, loss: LossRecipe | dict, shown: str, embed_dim: int, out_dim: int, recipe: DinoRecipe | None = None
    ) -> None:
        """DINOv2-style options (``dino.loss.koleo_weight``, ``ibot_weight``; ``centering`` lives in DINOLoss).
        iBOT needs patch tokens: on a non-ViT backbone it is switched off with a warning (``dino=dinov2`` keeps KoLeo
        and Sinkhorn-Knopp). Its mask token is a parameter of the student wrapper (and, unused, of the teacher, so the
        EMA pairs parameters one to one); the exported backbone is unchanged."""
        if not isinstance(loss, LossRecipe):
            loss = build_section(LossRecipe, loss, "dino.loss")
        self.koleo_weight = loss.koleo_weight
        self.ibot_weight = loss.ibot_weight
        self.ibot_loss: IBOTPatchLoss | None = None
        if self.ibot_weight and not is_vit(self.student.backbone):
            log.warning(
                "dino.loss.ibot_weight=%g ignored: the iBOT masked-patch loss needs a ViT backbone "
                "(backbone=vit_small); %s has no patch tokens",
                self.ibot_weight,
                shown,
            )
            self.ibot_weight = 0.0
        ibot_head = recipe.ibot_head if recipe is not None else None
        self.separate_ibot_head = bool(self.ibot_weight and ibot_head is not None and ibot_head.separate)
        if self.ibot_weight:
            ibot_dim = ibot_head.out_dim if self.separate_ibot_head and ibot_head is not None else out_dim
            self.ibot_loss = IBOTPatchLoss(
                ibot_dim, loss.student_temp, loss.center_momentum, loss.centering, loss.sinkhorn_iterations
            )
            self.student.mask_token = torch.nn.Parameter(torch.zeros(1, embed_dim))
            self.teacher.mask_token = torch.nn.Parameter(torch.zeros(1, embed_dim))
        if self.separate_ibot_head and ibot_head is not None and recipe is not None:
            # DINOv2's separate iBOT head: same architecture options as the DINO head, its own sizes
            head_cfg = {**dataclasses.asdict(recipe.head), **dataclasses.asdict(ibot_head)}
            head_cfg.pop("separate")
            ibot_out = head_cfg.pop("out_dim")
            self.student.ibot_head = DINOHead(embed_dim, ibot_out, **head_cfg)
            self.teacher.ibot_head = DINOHead(embed_dim, ibot_out, **head_cfg)
        self._dinov2_step = bool(self.koleo_weight or self.ibot_loss is not None)

    def setup(self, stage: str) -> None:
        """``performance.*`` that act on the process or compile the backbones (once, in every DDP process); every
        rank resumes from the same checkpoint (checked once the process group exists, before it is restored)."""
        if stage == "fit" and self._trainer is not None and self.trainer.world_size > 1:
            check_same_checkpoint(self.resume_checkpoint, self.trainer.world_size)
        if self.performance["cudnn_benchmark"] and torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = True
        if self.performance["compile"] and not self._compiled:
            mode = self.performance["compile_mode"]
            kwargs = {
                "dynamic": False,
                "backend": self.performance["compile_backend"],
                **({"mode": mode} if mode else {}),
            }
            compile_with_fallback(self.student.backbone, "student backbone", **kwargs)
            compile_with_fallback(self.teacher.backbone, "teacher backbone", **kwargs)
            self._compiled = True

    def on_fit_start(self) -> None:
        """``backbone.init_weights``: start student and teacher (and head + center, when the file has them) from a
        file, on a fresh run only: when Lightning restores a checkpoint (``trainer.ckpt_path``, set by now), the
        resumed state stands and the file is not read."""
        source = self.backbone_cfg.get("init_weights")
        if not source:
            return
        if self.trainer.ckpt_path:
            log.info("init_weights %s not applied: resuming from %s", source, self.trainer.ckpt_path)
            return
        name = self.backbone_cfg["name"]
        initialize_dino(
            self.student,
            self.teacher,
            str(source),
            name,
            center=self.dino_loss.center,
            load_head=bool(self.backbone_cfg.get("init_head", True)),
        )

    # ----------------------------------------------------------------------------------------------------- setup
    def _steps_per_epoch(self) -> int:
        """Optimizer steps per epoch *that the Trainer will run* (``limit_train_batches`` applied): epoch-based
        warmups are converted to steps with it, and the schedules' clock advances by 1/this per step."""
        total = int(self.trainer.estimated_stepping_batches)  # also sets up the train dataloader
        batches = self.trainer.num_training_batches
        if isinstance(batches, int) or (isinstance(batches, float) and math.isfinite(batches)):
            return max(1, int(batches) // self.trainer.accumulate_grad_batches)
        epochs = int(self.trainer.max_epochs or 0)  # no length known (an iterable loader)
        return max(1, total // epochs) if epochs > 0 else max(1, total)

    def build_schedules(self, total_steps: int, steps_per_epoch: int, global_batch: int) -> None:
        """Per-optimizer-step schedules of lr, weight decay, teacher momentum and teacher temperature, for a run of
        ``total_steps`` steps of ``steps_per_epoch`` each (the official DINO arrays); indexed by progress."""
        opt, loss, tea = self.recipe.optimizer, self.recipe.loss, self.recipe.teacher
        peak_lr = scaled_lr(opt.base_lr, global_batch, opt.reference_batch, opt.lr_scaling)
        warmup_steps = int(opt.warmup_epochs * steps_per_epoch)
        temp_warmup_steps = int(loss.warmup_teacher_temp_epochs * steps_per_epoch)
        for what, steps, key in (
            ("lr", warmup_steps, "dino.optimizer.warmup_epochs"),
            ("teacher temperature", temp_warmup_steps, "dino.loss.warmup_teacher_temp_epochs"),
        ):
            if steps > total_steps:  # official DINO asserts; a short debug run is legitimate, so say it loudly
                log.warning(
                    "the %s warmup (%s: %d optimizer steps of %d per epoch) is longer than the whole run (%d steps): "
                    "it never reaches its peak and never decays. Shorten %s or train longer.",
                    what,
                    key,
                    steps,
                    steps_per_epoch,
                    total_steps,
                    key,
                )
        self.schedules = {
            "lr": cosine_schedule(peak_lr, opt.min_lr, total_steps, warmup_steps=warmup_steps),
            "wd": cosine_schedule(opt.weight_decay, opt.weight_decay_end, total_steps),
            "momentum": cosine_schedule(tea.momentum, tea.momentum_end, total_steps),
            "teacher_temp": teacher_temp_schedule(
                loss.warmup_teacher_temp, loss.teacher_temp, temp_warmup_steps, total_steps
            ),
        }
        # Python copies, read every step: indexing a tensor and float() of the element is an ATen read per value
        self._schedule_values = {k: v.tolist() for k, v in self.schedules.items()}
        self.global_batch = global_batch
        self.peak_lr = peak_lr
        self.steps_per_epoch = max(1, steps_per_epoch)

    def _schedule_index(self) -> int:
        """The step of this run's schedule arrays at the current training progress (official DINO's
        ``len(data_loader) * epoch + it``): the optimizer step itself in an uninterrupted run, and the same point of
        the recipe after a resume on another world size, batch, accumulation or epoch length."""
        return int(round(self.progress_epochs * self.steps_per_epoch))

    def _scheduled(self, name: str, step: int) -> float:
        values = self._schedule_values[name]
        return values[min(step, len(values) - 1)]

    def _is_log_step(self) -> bool:
        """Whether Lightning writes this optimizer step's metrics (``trainer.log_every_n_steps``; called before the
        step increments ``global_step``). Everything that reads a value back to the host happens on these steps
        only: Lightning's own ``.item()`` of the logged metrics, the progress bar, the collapse diagnostics."""
        if self._trainer is None:  # a step called by hand (tests): nothing is written
            return False
        every = self.trainer.log_every_n_steps  # type: ignore[attr-defined]  # set by Lightning's connectors
        return bool(every) and (self.global_step + 1) % every == 0

    def _log_scalars(self, values: dict[str, float], batch_size: int) -> None:
        """Host numbers logged as device tensors made by a fill kernel (``torch.full``): ``self.log`` of a Python
        float is ``torch.tensor(v, device=...)``, a blocking host-to-device copy. Only on the steps Lightning
        writes out: in between they would be overwritten unread."""
        if self._is_log_step():
            self.log_dict(
                {k: torch.full((), float(v), device=self.device) for k, v in values.items()}, batch_size=batch_size
            )

    def progress_state(self) -> dict[str, Any]:
        """What a checkpoint records of the progress (plain values: checkpoints are loaded with weights_only)."""
        return {
            "epochs": float(self.progress_epochs),
            "samples_seen": int(self.samples_seen),
            "global_batch": int(self.global_batch),
            "steps_per_epoch": int(self.steps_per_epoch),
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainer = self.trainer
        global_batch = self.batch_size * trainer.world_size * trainer.accumulate_grad_batches
        # trainer.max_steps=0 (export the untrained teacher): no step is taken, but the schedules need a length
        self.build_schedules(max(1, int(trainer.estimated_stepping_batches)), self._steps_per_epoch(), global_batch)
        if self._legacy_step is not None:
            self.progress_epochs, self._legacy_step = self._legacy_step / self.steps_per_epoch, None
        saved = self._resumed_progress
        if saved is not None and (
            saved.get("global_batch") != global_batch or saved.get("steps_per_epoch") != self.steps_per_epoch
        ):
            log.warning(
                "resumed with another global batch or epoch length than the checkpoint (global batch %s -> %d, "
                "optimizer steps per epoch %s -> %d): the schedules continue at the same progress (epoch %.3f, "
                "schedule step %d of %d), with the peak lr rescaled by the recipe's rule to %.3g",
                saved.get("global_batch"),
                global_batch,
                saved.get("steps_per_epoch"),
                self.steps_per_epoch,
                self.progress_epochs,
                self._schedule_index(),
                len(self.schedules["lr"]),
                self.peak_lr,
            )
        log.info(
            "global batch %d (= %d per device x %d devices x %d accumulation); peak lr %.3g; %d optimizer steps",
            global_batch,
            self.batch_size,
            trainer.world_size,
            trainer.accumulate_grad_batches,
            self.peak_lr,
            len(self.schedules["lr"]),
        )
        betas = self.recipe.optimizer.betas
        fused = use_fused_adamw(self.performance["fused_adamw"], self.device, trainer.precision)
        extra = {"fused": True} if fused else {}
        opt = self.recipe.optimizer
        groups = param_groups(
            self.student,
            layerwise_decay=opt.layerwise_decay,
            patch_embed_lr_mult=opt.patch_embed_lr_mult,
            backbone_lr_mult=opt.backbone_lr_mult,
            split_last_layer=opt.freeze_last_layer_mode == "zero_lr",
        )
        return torch.optim.AdamW(groups, lr=self.peak_lr, betas=betas, **extra)

    # -------------------------------------------------------------------------------------------------- training
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """``data.decode=gpu``: the batch carries JPEG bytes (``jpeg``, on the host, as the decoder wants them):
        decode them on ``device`` into GPU mode's ``frames`` / ``frame_hw`` canvas batch
        (:func:`surgenet_ssl.data.gpu_decode.decode_to_canvas`); the rest is copied as usual."""
        if not (isinstance(batch, dict) and "jpeg" in batch):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        from surgenet_ssl.data.gpu_decode import decode_to_canvas

        batch = dict(batch)
        jpeg, canvas = batch.pop("jpeg"), batch.pop("canvas_hw")
        keys = list(batch["key"]) if "key" in batch else None
        frames, sizes = decode_to_canvas(jpeg, canvas.tolist(), device, keys=keys, count=self._count_data_problem)
        batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        if keys is not None:
            batch["key"] = keys
        return {**batch, "frames": frames, "frame_hw": sizes}

    def _count_data_problem(self, name: str, n: int) -> None:
        """Count a bad frame found in the training process with the loader's counters (``data/<name>``)."""
        trainer = getattr(self, "_trainer", None)
        stream: Any = getattr(getattr(trainer, "train_dataloader", None), "dataset", None)
        if stream is not None and hasattr(stream, "count_in_training_process"):
            stream.count_in_training_process(name, n)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Device side of the loader, after the (pinned, asynchronous) copy of uint8 data.

        ``data.augment_on=gpu``: the loader delivers uint8 ``frames`` (+ ``frame_hw``); make the multi-crops here.
        ``data.uint8_crops``: normalise the uint8 crops here. ``performance.channels_last``: NHWC crops; otherwise
        contiguous NCHW: the fast backend ships its crops channel-last (``stack_crops`` in the loader), so the
        channel-first copy is made here, on the device, instead of in the CPU workers.
        """
        if not isinstance(batch, dict):
            return batch
        channels_last = getattr(self, "performance", {}).get("channels_last", False)
        crops = batch.get("crops")
        if crops is not None:
            from surgenet_ssl.data.gpu_augment import normalize_uint8

            layout = to_channels_last if channels_last else torch.Tensor.contiguous
            ready = [layout(normalize_uint8(c) if c.dtype == torch.uint8 else c) for c in crops]
            if any(r is not c for r, c in zip(ready, crops, strict=True)):  # else: the batch as it came
                batch = {**batch, "crops": ready}
        if "frames" in batch:
            if getattr(self, "_gpu_augment", None) is None:
                from surgenet_ssl.data.augment import recipe_from_crops
                from surgenet_ssl.data.gpu_augment import GpuMultiCrop

                # The dino.crops dict, as the CPU path gets it (datamodule): recipe_from_crops reads its knobs.
                c = self.dino_cfg["crops"]
                self._gpu_augment = GpuMultiCrop(
                    c["global_size"],
                    c["local_size"],
                    c["global_scale"],
                    c["local_scale"],
                    c["local_number"],
                    probabilities=recipe_from_crops(c),
                )
                self._gpu_generator = torch.Generator(device=batch["frames"].device)  # different per rank
                self._gpu_generator.manual_seed(torch.initial_seed() + 1_000_003 * (self.global_rank + 1))
                saved = (getattr(self, "_rng_to_restore", None) or {}).get("gpu_augment")
                if saved is not None:  # resumed: continue the saved stream of crops
                    self._gpu_generator.set_state(saved)
            batch = dict(batch)
            frames, sizes = batch.pop("frames"), batch.pop("frame_hw", None)
            crops = self._gpu_augment(frames, generator=self._gpu_generator, sizes=sizes)
            batch["crops"] = [to_channels_last(c) for c in crops] if channels_last else crops
        return batch

    def _dinov2_forward(
        self, crops: list[torch.Tensor], teacher_temp: float, batch_idx: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The step with KoLeo and/or iBOT: backbone and head called separately, because KoLeo needs the student's
        pooled features and iBOT the patch tokens of masked student / unmasked teacher global crops. Returns the
        total loss, the teacher and student head outputs (as ``self.teacher/student(crops)``) and the loss parts."""
        b = crops[0].shape[0]
        global_crops = torch.cat(crops[:2])
        masks = None
        if self.ibot_loss is not None:
            vit: Any = self.student.backbone  # a timm ViT (iBOT needs one): patch_size is (height, width)
            patch = vit.patch_embed.patch_size
            grid = (global_crops.shape[-2] // patch[0], global_crops.shape[-1] // patch[1])
            c = self.recipe.loss
            # per rank, per step and micro-batch (DINOv2: seed + rank); reproducible on resume, no device sync
            rng = mask_rng(self._base_seed, self.global_step, batch_idx, self.global_rank)
            masks = block_masks(2 * b, grid, c.ibot_mask_probability, c.ibot_mask_ratio, rng)
            masks = masks.to(global_crops.device)
        with torch.no_grad():
            if masks is None:
                teacher_out = self.teacher(crops[:2])
            else:
                t_pooled, t_patch = vit_tokens(self.teacher.backbone, global_crops)
                t_masked = t_patch.flatten(0, 1).index_select(0, masks.index)
                if self.separate_ibot_head:
                    ibot_head = cast("torch.nn.Module", self.teacher.ibot_head)
                    teacher_out, t_patch_out = self.teacher.head(t_pooled), ibot_head(t_masked)
                else:  # one pass of the shared head
                    t_all = self.teacher.head(torch.cat([t_pooled, t_masked]))
                    teacher_out, t_patch_out = t_all[: 2 * b], t_all[2 * b :]
        if masks is None:
            s_pooled, s_masked = self.student.backbone(global_crops), []
        else:
            s_pooled, s_patch = vit_tokens(
                self.student.backbone, global_crops, masks.masks, self.student.get_parameter("mask_token")
            )
            s_masked = [s_patch.flatten(0, 1).index_select(0, masks.index)]
        features = [s_pooled, *backbone_features(self.student.backbone, crops[2:])]
        n_rows = sum(f.shape[0] for f in features)
        if self.separate_ibot_head:
            student_out = self.student.head(torch.cat(features))
            ibot_head = cast("torch.nn.Module", self.student.ibot_head)
            s_patch_out = ibot_head(s_masked[0]) if s_masked else student_out[:0]
        else:
            s_all = self.student.head(torch.cat(features + s_masked))
            student_out, s_patch_out = s_all[:n_rows], s_all[n_rows:]
        loss = self.dino_loss(student_out, teacher_out, teacher_temp)
        parts = {"dino_loss": loss.detach()}
        if self.koleo_weight:
            first, second = (koleo_loss(x) for x in s_pooled.chunk(2))  # per global crop, never two of one image
            koleo = first + second
            loss = loss + self.koleo_weight * koleo
            parts["koleo_loss"] = koleo.detach()
        if masks is not None and self.ibot_loss is not None:  # (masks only with the iBOT loss)
            ibot = self.ibot_loss(s_patch_out, t_patch_out, masks.weights, masks.n_images, teacher_temp)
            loss = loss + self.ibot_weight * ibot
            parts["ibot_loss"] = ibot.detach()
        return loss, teacher_out, student_out, parts

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        crops = batch["crops"]
        step = self.global_step
        teacher_temp = self._scheduled("teacher_temp", self._schedule_index())
        if self._dinov2_step:  # dino.loss.koleo_weight / ibot_weight
            loss, teacher_out, student_out, parts = self._dinov2_forward(crops, teacher_temp, batch_idx)
            self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=crops[0].shape[0])
        else:  # the DINO recipe
            with torch.no_grad():
                teacher_out = self.teacher(crops[:2])
            student_out = self.student(crops)
            loss = self.dino_loss(student_out, teacher_out, teacher_temp)
        # No host sync here: the ranks agree on the loss being finite before the optimizer step.
        self._agreement.record_loss(loss, (step, self.current_epoch, batch_idx))
        bs = crops[0].shape[0]
        shown = loss.detach()
        if self._is_log_step() and self.trainer.world_size > 1:
            # the steps Lightning writes out show the mean over ranks, not rank 0's (one all-reduce, no host sync;
            # on a copy: the all-reduce works in place and the loss tensor is the one backward and the checks use)
            shown = self.trainer.strategy.reduce(shown.clone(), reduce_op="mean")
        # A device tensor, not prog_bar=True: Lightning converts progress-bar metrics with .item() after every batch.
        # The progress bar (surgenet_ssl.callbacks.progress) shows it on the logging steps only.
        self.log("train/loss", shown, batch_size=bs)
        self._log_scalars({"train/teacher_temp": teacher_temp}, bs)
        every = self.diagnostics_every_n_steps
        # their figures are read on the host: on the steps (step + 1) % N == 0, logging steps when N is a multiple of
        # trainer.log_every_n_steps (the defaults: 50 and 10)
        if every and (step + 1) % every == 0 and batch_idx % self.trainer.accumulate_grad_batches == 0:
            self._log_diagnostics(teacher_out, student_out, teacher_temp, bs)
        return loss

    @torch.no_grad()
    def _log_diagnostics(self, teacher_out: torch.Tensor, student_out: torch.Tensor, temp: float, bs: int) -> None:
        """Collapse diagnostics on this batch; warns (after the first epoch's warmup) when they look collapsed."""
        metrics = collapse_diagnostics(
            teacher_out.float(),
            student_out[: teacher_out.shape[0]].float(),
            center=self.dino_loss.center,
            teacher_temp=temp,
            student_temp=self.dino_loss.student_temp,
        )
        if self.trainer.world_size > 1:  # the run's figures (every rank is here: the same step rule on all)
            names = sorted(metrics)
            local = torch.tensor([metrics[k] for k in names], dtype=torch.float64, device=self.device)
            mean = self.trainer.strategy.reduce(local, reduce_op="mean")
            metrics = dict(zip(names, mean.tolist(), strict=True))
        # Straight to the loggers (not self.log): a sparse metric must not be re-emitted with stale values.
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics({f"diag/{k}": float(v) for k, v in metrics.items()}, step=self.global_step)
        if getattr(self, "_collapse", None) is None:  # warns when collapse persists (see CollapseTracker)
            self._collapse = CollapseTracker(out_dim=teacher_out.shape[-1])
        warning = self._collapse.update(metrics)
        if warning and self.current_epoch >= 1 and self.trainer.is_global_zero:
            log.warning("step %d: %s", self.global_step, warning)

    def _act_on(self, agreed: Agreement | None) -> None:
        """What all ranks agreed on: a non-finite loss on any rank stops every rank with the message (before the
        optimizer step, or on CUDA before the next checkpoint is written); a preemption signal sets ``stop_agreed``
        (callbacks.PreemptionCheckpoint saves and stops at the end of the step)."""
        if agreed is None:
            return
        if agreed.any_bad:
            raise FloatingPointError(agreed.message())
        self.stop_agreed = self.stop_agreed or agreed.stop

    def check_pending_steps(self) -> None:
        """Settle the agreement of steps not read yet (pipelined on CUDA): before a checkpoint or an export."""
        self._act_on(self._agreement.resolve())

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # One all-reduce of two flags per optimizer step; on CPU read at once, on CUDA one step later (no host wait).
        where = (self.global_step, self.current_epoch, -1)
        self._act_on(self._agreement.submit(PREEMPTION.requested, where, self.device))
        # Runs after AMP unscaling, so the clip threshold applies to true gradient norms.
        opt = self.recipe.optimizer
        clip = opt.clip_grad
        if clip:
            if opt.clip_mode == "per_module":  # DINOv2: backbone (+ mask token), DINO head, iBOT head
                total_norm = clip_gradients_per_module(self._clip_modules(), clip)
            else:
                total_norm = clip_gradients_per_parameter(self.student, clip)  # a device tensor: no host sync here
            if self._is_log_step():  # the steps whose metrics Lightning writes out
                self.log("train/grad_norm", total_norm, batch_size=self.batch_size)
        if opt.freeze_last_layer_mode == "drop_gradient":  # DINO; DINOv2's lr 0 is set in optimizer_step
            cancel_last_layer_gradients(self.student, self.current_epoch, opt.freeze_last_layer)
        cancel_backbone_gradients(self.student, self.current_epoch, int(self.backbone_cfg.get("freeze_epochs") or 0))

    def _clip_modules(self) -> list[torch.nn.Module]:
        """The student's parts clipped each on its own (DINOv2): the backbone with the mask token, the heads."""
        backbone = torch.nn.ModuleDict({"backbone": self.student.backbone})
        if "mask_token" in dict(self.student.named_parameters(recurse=False)):
            backbone.register_parameter("mask_token", self.student.get_parameter("mask_token"))
        heads = [self.student.head]
        if hasattr(self.student, "ibot_head"):
            heads.append(cast("torch.nn.Module", self.student.ibot_head))
        return [backbone, *heads]

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        step = self._schedule_index()
        lr, wd = self._scheduled("lr", step), self._scheduled("wd", step)
        frozen = step < int(self.recipe.optimizer.freeze_last_layer * self.steps_per_epoch)
        last_layer_lr = 0.0 if frozen else lr  # groups with is_last_layer (freeze_last_layer_mode=zero_lr only)
        for group in optimizer.param_groups:
            # .get: groups restored from checkpoints of older versions have only name/lr/weight_decay
            group["lr"] = (last_layer_lr if group.get("is_last_layer") else lr) * group.get("lr_multiplier", 1.0)
            if group.get("wd_multiplier", 1.0 if group.get("name") == "decay" else 0.0):
                group["weight_decay"] = wd * group.get("wd_multiplier", 1.0)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        momentum = self._scheduled("momentum", step)
        update_teacher(self.student, self.teacher, momentum)
        self.dino_loss.update_center()
        if self.ibot_loss is not None:
            self.ibot_loss.update_center()
        self.progress_epochs += 1.0 / self.steps_per_epoch
        self.samples_seen += self.global_batch  # what this step really trained on (for the model card)
        # global_step is not incremented yet here (Lightning does it after this hook): the logging step rule holds
        self._log_scalars(
            {
                "train/lr": lr,
                "train/weight_decay": wd,
                "train/teacher_momentum": momentum,
                "train/global_batch": self.global_batch,
                "train/batch_per_device": self.batch_size,
            },
            self.batch_size,
        )

    def on_train_epoch_start(self) -> None:
        epoch = self.current_epoch
        if not epoch - 1e-6 <= self.progress_epochs < epoch + 1 - 1e-6:  # a new epoch (not a mid-epoch resume)
            self.progress_epochs = float(epoch)  # exact at every epoch start, whatever the last epoch's length
        loader = self.trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if dataset is not None and hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _rng_state(self) -> dict[str, Any]:
        """This process' random state: drop-path masks (torch), anything numpy/random, the GPU augmentation."""
        import random

        import numpy as np

        # the global RandomState is an MT19937: its legacy state is a tuple
        legacy = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
        name, keys, pos, has_gauss, gauss = legacy
        # Tensors and plain values only: Lightning loads checkpoints with weights_only=True.
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "random": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        }
        if torch.cuda.is_available() and self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        generator = getattr(self, "_gpu_generator", None)
        if generator is not None:
            state["gpu_augment"] = generator.get_state()
        return state

    def _restore_rng_state(self, state: dict[str, Any]) -> None:
        import random

        import numpy as np

        torch.set_rng_state(state["torch"])
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(state["random"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_pending_steps()  # never write the weights of a step whose loss was not finite
        checkpoint["global_batch"] = self.global_batch
        checkpoint["progress"] = self.progress_state()  # the schedules' clock and the frames seen
        # Every rank's RNG state, so that a resumed run draws the same drop-path masks and GPU crops.
        checkpoint["rng_states"] = gather_from_ranks(self._rng_state(), self.trainer.world_size)

    def on_train_start(self) -> None:
        # After the loader and everything else are set up: from here on the random stream must be the saved one.
        if self._rng_to_restore is not None:
            self._restore_rng_state(self._rng_to_restore)
        elif self.global_rank > 0:  # DINOv2's fix_random_seeds(seed + rank): drop-path masks differ across ranks
            seed_rank_streams(self._base_seed, self.global_rank)  # (rank 0 keeps its stream: 1-process runs unchanged)
        self._align_elastic_resume()

    def _align_elastic_resume(self) -> None:
        """A resume on another number of ranks continues the epoch's frames (the data module's elastic resume);
        the loop's restored count of batches done is in the old layout's units, so it is set to the new layout's
        (Lightning's progress counters: the loop then runs exactly the batches the loader has left)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        batches = self.trainer.num_training_batches
        if datamodule is None or not hasattr(datamodule, "resumed_epoch_batches_done") or not math.isfinite(batches):
            return
        done = datamodule.resumed_epoch_batches_done(int(batches))
        if done is None:
            return
        epoch_loop = self.trainer.fit_loop.epoch_loop
        current = epoch_loop.batch_progress.current
        log.info("elastic resume: %d of the epoch's %d batches count as done on this layout", done, int(batches))
        for counter in ("ready", "started", "processed"):  # the batch tracker has all four counters
            setattr(current, counter, done)
        # A checkpoint written at the end of a batch: the epoch loop counts that batch completed when it starts
        # (``restarted_on_train_batch_end``), then continues from the completed count.
        current.completed = done - 1 if epoch_loop.restarted_on_train_batch_end else done

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        normalize_loop_progress(checkpoint)  # before the Trainer restores its loops: exact from any checkpoint
        progress = checkpoint.get("progress")
        if isinstance(progress, dict):
            self._resumed_progress = dict(progress)
            self.progress_epochs = float(progress.get("epochs", 0.0))
            self.samples_seen = int(progress.get("samples_seen", 0))
        else:  # a checkpoint of an older version: its step (converted with this run's epoch length, once known)
            step, batch = int(checkpoint.get("global_step", 0)), int(checkpoint.get("global_batch") or 0)
            self._legacy_step, self.samples_seen = step, step * batch
        states = checkpoint.get("rng_states") or []
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if self._trainer is not None else 0
        if len(states) == world:
            self._rng_to_restore = states[rank]
        elif states:
            log.warning(
                "checkpoint written by %d ranks, resumed on %d: random streams restart (data order and weights "
                "are restored)",
                len(states),
                world,
            )
        saved = checkpoint.get("hyper_parameters", {})
        current = {"backbone": self.backbone_cfg, "dino": self.dino_cfg}
        for key in RESUME_MUST_MATCH:
            old, new = _lookup(saved, key), _lookup(current, key)
            if old is not None and old != new:
                raise ValueError(
                    f"Cannot resume: the checkpoint was trained with {key}={old!r} but this run asks for "
                    f"{key}={new!r}. Use a new run dir (hydra.run.dir=...) for a different backbone or recipe, or "
                    "restore the old value."
                )

    def teacher_backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The teacher backbone's weights in timm naming, detached on CPU (what the exporters write)."""
        # contiguous: with performance.channels_last the weights are NHWC, which safetensors cannot write
        return {
            k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
            for k, v in self.teacher.backbone.state_dict().items()
        }

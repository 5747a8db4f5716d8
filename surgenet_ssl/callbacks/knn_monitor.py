"""Online k-NN monitor: DINO's weighted k-NN on teacher features of a labelled set, every N epochs, plus a t-SNE
embedding map (the SurgeNet paper's Fig. 3) saved in the run dir.

The labelled set is either an image folder with class subfolders (``train_dir``/``val_dir``) or, by default, the
training sources themselves labelled by source (= procedure on the demo data): per source the frames of the last
video are queries and the other videos are the memory bank, so a query never has a near-duplicate neighbour from
its own video.

With ``baseline=True`` (default) it also measures the teacher before the first step of a fresh run (logged at step
0: the random-init baseline, or the ``backbone.init_weights`` starting point), and at the end of training logs
``k-NN top-1: <baseline> at init -> <final> after N steps``. BatchNorm layers that never saw data (a fresh BatchNorm
backbone at step 0) are scored with statistics estimated on the memory images (``evaluation/batch_norm.py``): with
their 0/1 initial statistics the baseline would be artificially low and the first epoch's "rise" an artefact.
"""

from __future__ import annotations

import io
import logging
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image

from surgenet_ssl.data.location import join
from surgenet_ssl.data.shards import iter_shard
from surgenet_ssl.evaluation import (
    ImageFolderDataset,
    calibrate_batch_norm,
    effective_rank,
    eval_transform,
    knn_accuracy,
    save_embedding_map,
)

log = logging.getLogger(__name__)

# A teacher whose feature rank fell below this fraction of its step-0 rank gets a dimensional-collapse warning (the
# default demo: 55.0 -> 2.3 on the 120 memory images, i.e. 0.04, and downstream mIoU 0.78 -> 0.40; at peak lr 5e-4
# 55.0 -> 7.9, 0.14, not warned).
DIMENSIONAL_COLLAPSE_RATIO = 0.1


@dataclass
class LabelledImages:
    images: list[torch.Tensor]
    labels: list[int]
    videos: list[str] = field(default_factory=list)  # where each image came from (prepared sources only)


def frames_by_source(sources: list, max_per_class: int, transform) -> tuple[LabelledImages, LabelledImages, list[str]]:
    """Memory and query sets from prepared sources (``SourceSpec``: name, directory, shards with a video id).

    Per source the last video is the query set and the other videos the memory bank; each set takes at most
    ``max_per_class`` frames, spread evenly over its videos (not just the first video's frames).
    """
    memory, query = LabelledImages([], []), LabelledImages([], [])
    names = [s.name for s in sources]
    for label, source in enumerate(sources):
        by_video: dict[str, list[dict]] = {}
        for shard in source.shards:
            by_video.setdefault(str(shard.get("video", shard["file"])), []).append(shard)
        videos = sorted(by_video)
        splits: list[tuple[LabelledImages, list[str], int | None]]  # (set, its videos, frame parity or all)
        if len(videos) > 1:
            splits = [(memory, videos[:-1], None), (query, videos[-1:], None)]
        else:  # one video: alternate its frames between the two sets
            splits = [(memory, videos, 0), (query, videos, 1)]
        for target, split_videos, parity in splits:
            quota = max(1, -(-max_per_class // len(split_videos)))  # frames per video, rounded up
            taken = 0
            for video in split_videos:
                kept = 0
                for shard in by_video[video]:
                    if kept >= quota or taken >= max_per_class:
                        break
                    path = join(source.directory, shard["file"])  # a local path or a URL
                    try:
                        for i, (_, sample) in enumerate(iter_shard(path, extensions=("jpg",))):
                            if kept >= quota or taken >= max_per_class:
                                break
                            if parity is not None and i % 2 != parity:
                                continue
                            target.images.append(transform(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")))
                            target.labels.append(label)
                            target.videos.append(f"{source.name}/{video}")
                            kept, taken = kept + 1, taken + 1
                    except (OSError, EOFError, tarfile.TarError) as err:  # a damaged shard costs its frames only
                        log.warning("k-NN monitor: skipped unreadable shard %s (%s)", path, err)
    return memory, query, names


def _mixture(trainer: pl.Trainer) -> Any:
    """The training mixture (the same on every rank), or None when the loader is not ours."""
    return getattr(getattr(trainer.train_dataloader, "dataset", None), "mixture", None)


def folder_images(directory: str, classes: list[str] | None, transform_size: int) -> tuple[LabelledImages, list[str]]:
    dataset = ImageFolderDataset(directory, image_size=transform_size, classes=classes, min_classes=1 if classes else 2)
    images, labels = [], []
    for i in range(len(dataset)):
        img, label, ok = dataset[i]
        if ok:
            images.append(img)
            labels.append(int(label))
    return LabelledImages(images, labels), list(dataset.classes)


class KNNMonitor(pl.Callback):
    def __init__(
        self,
        every_n_epochs: int = 1,
        k: int = 20,
        temperature: float = 0.07,
        image_size: int = 224,
        max_per_class: int = 200,
        train_dir: str | None = None,
        val_dir: str | None = None,
        embedding_map: bool = True,
        output_dir: str | None = None,
        batch_size: int = 64,
        baseline: bool = True,
    ) -> None:
        self.every_n_epochs = every_n_epochs
        self.k, self.temperature, self.image_size = k, temperature, image_size
        self.max_per_class, self.train_dir, self.val_dir = max_per_class, train_dir, val_dir
        self.embedding_map, self.output_dir, self.batch_size = embedding_map, output_dir, batch_size
        self._sets: tuple[LabelledImages, LabelledImages, list[str]] | None = None
        self._rank_warned = False
        self.last_result: dict[str, float] = {}
        self.last_epoch: int | None = None
        self.baseline = baseline
        self.baseline_result: dict[str, float] = {}  # at step 0 (before any training step)

    def state_dict(self) -> dict:
        """The last result travels in checkpoints: the model card of an export (also a later one from the CLI)
        reports the final online k-NN from it."""
        state = {"last_result": dict(self.last_result), "last_epoch": self.last_epoch} if self.last_result else {}
        if self.baseline_result:
            state["baseline_result"] = dict(self.baseline_result)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_result = dict(state_dict.get("last_result") or {})
        self.last_epoch = state_dict.get("last_epoch")
        self.baseline_result = dict(state_dict.get("baseline_result") or {})

    def _load_sets(self, trainer: pl.Trainer) -> tuple[LabelledImages, LabelledImages, list[str]] | None:
        if self._sets is None:
            if self.train_dir and self.val_dir:
                memory, classes = folder_images(self.train_dir, None, self.image_size)
                query, _ = folder_images(self.val_dir, classes, self.image_size)
                self._sets = (memory, query, classes)
            else:
                mixture = _mixture(trainer)
                if mixture is None or len(mixture.sources) < 2:  # decided on every rank before (_decide_on_every_rank)
                    return None
                transform = eval_transform(self.image_size)
                self._sets = frames_by_source(mixture.sources, self.max_per_class, transform)
            memory, query, classes = self._sets
            log.info(
                "k-NN monitor: %d memory / %d query images, %d classes",
                len(memory.labels),
                len(query.labels),
                len(classes),
            )
        return self._sets

    @torch.no_grad()
    def _features(self, backbone: torch.nn.Module, images: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        out = [
            backbone(torch.stack(images[i : i + self.batch_size]).to(device)).float().cpu()
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(out)

    def _decide_on_every_rank(self, trainer: pl.Trainer) -> None:
        """Whether the monitor runs, decided identically on every rank (and broadcast from rank 0 to be sure): the
        other ranks wait in a barrier while rank 0 evaluates, so a monitor that turned itself off on rank 0 alone
        would leave them in a barrier rank 0 never enters (a single-source dataset on 2 GPUs hung at epoch 1)."""
        if self.every_n_epochs > 0 and not (self.train_dir and self.val_dir):
            mixture = _mixture(trainer)
            if mixture is None or len(mixture.sources) < 2:
                if trainer.is_global_zero:
                    log.warning("k-NN monitor off: no labelled set given and fewer than 2 training sources to use")
                self.every_n_epochs = 0
        if trainer.world_size > 1:
            self.every_n_epochs = int(trainer.strategy.broadcast(self.every_n_epochs, src=0))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The untrained teacher of a fresh run (step 0): the baseline every later k-NN is compared with."""
        self._decide_on_every_rank(trainer)
        if self.every_n_epochs <= 0 or not self.baseline or trainer.global_step != 0:
            return
        if trainer.is_global_zero:
            self._evaluate(trainer, pl_module, 0)
            self.baseline_result = dict(self.last_result)
        trainer.strategy.barrier("knn_monitor_baseline")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.baseline_result and self.last_result:
            if "knn/feature_rank" in self.baseline_result and "knn/feature_rank" in self.last_result:
                log.info(
                    "teacher feature rank (RankMe): %.1f at init -> %.1f after %d steps",
                    self.baseline_result["knn/feature_rank"],
                    self.last_result["knn/feature_rank"],
                    trainer.global_step,
                )
            log.info(
                "k-NN top-1: %.4f at init -> %.4f after %d steps",
                self.baseline_result["knn/top1"],
                self.last_result["knn/top1"],
                trainer.global_step,
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        done = trainer.current_epoch + 1
        if self.every_n_epochs <= 0 or done % self.every_n_epochs:
            return
        if trainer.is_global_zero:
            self._evaluate(trainer, pl_module, done)
        trainer.strategy.barrier("knn_monitor")

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        sets = self._load_sets(trainer)
        if sets is None or not sets[0].labels or not sets[1].labels:
            return
        memory, query, classes = sets
        backbone = pl_module.get_submodule("teacher.backbone")
        step = self.batch_size
        batches = (torch.stack(memory.images[i : i + step]) for i in range(0, len(memory.images), step))
        backbone, calibrated = calibrate_batch_norm(backbone, batches, pl_module.device)
        if calibrated:
            log.info(
                "k-NN monitor: %d BatchNorm layer(s) of the teacher never saw data (running mean 0, variance 1); "
                "scored with their statistics estimated on the %d memory images (a copy; training is not affected)",
                calibrated,
                len(memory.images),
            )
        was_training = backbone.training
        backbone.eval()
        try:
            mem_f = self._features(backbone, memory.images, pl_module.device)
            qry_f = self._features(backbone, query.images, pl_module.device)
        finally:
            backbone.train(was_training)
        mem_y, qry_y = torch.tensor(memory.labels), torch.tensor(query.labels)
        top1, top5 = knn_accuracy(
            mem_f, mem_y, qry_f, qry_y, num_classes=len(classes), k=self.k, temperature=self.temperature
        )
        rank = effective_rank(mem_f)
        self.last_result, self.last_epoch = {"knn/top1": top1, "knn/top5": top5, "knn/feature_rank": rank}, epoch
        for logger in trainer.loggers:
            logger.log_metrics({**self.last_result, "epoch": epoch}, step=trainer.global_step)
        when = f"epoch {epoch}" if epoch else "step 0 (untrained teacher)"
        log.info(
            "%s: k-NN top-1 %.4f, top-5 %.4f (%d classes); feature rank %.1f", when, top1, top5, len(classes), rank
        )
        start_rank = self.baseline_result.get("knn/feature_rank") if epoch else None
        if start_rank and rank < DIMENSIONAL_COLLAPSE_RATIO * start_rank and not self._rank_warned:
            self._rank_warned = True  # once per run: the rank is logged at every evaluation anyway
            log.warning(
                "dimensional collapse suspected: the teacher's features on the %d memory images span an effective rank "
                "of %.1f, down from %.1f at init (RankMe); such features fine-tune badly. Check the peak lr "
                "(dino.optimizer.base_lr) and warm-up (dino.optimizer.warmup_epochs) before using this teacher.",
                len(memory.labels),
                rank,
                start_rank,
            )
        if self.embedding_map:
            out_dir = Path(self.output_dir or trainer.default_root_dir) / "embeddings"
            path = save_embedding_map(
                torch.cat([mem_f, qry_f]).numpy(),
                torch.cat([mem_y, qry_y]).numpy(),
                out_dir / f"epoch{epoch:04d}.png",
                label_names=classes,
                title=f"teacher embeddings, epoch {epoch}",
            )
            for logger in trainer.loggers:
                if hasattr(logger, "log_image"):
                    logger.log_image(key="embedding_map", images=[str(path)], step=trainer.global_step)

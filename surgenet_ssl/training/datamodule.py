"""LightningDataModule: builds the streaming loader once the rank and world size are known (after DDP start)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from surgenet_ssl.data.augment import (
    GPU_FRAME_SIZE,
    FrameResize,
    FrameTransform,
    multi_crop_class,
    recipe_from_crops,
    recipe_probabilities,
)
from surgenet_ssl.data.gpu_decode import DECODE_MODES, JpegBytes
from surgenet_ssl.data.loader import build_train_loader
from surgenet_ssl.data.mixture import ResolvedMixture, resolve_mixture
from surgenet_ssl.runtime.distributed import gather_from_ranks

log = logging.getLogger(__name__)


def build_augmentation(
    crops: dict,
    backend: str = "fast",
    augment_on: str = "cpu",
    frame_size: Any = GPU_FRAME_SIZE,
    uint8_crops: bool = False,
    decode: str = "cpu",
    max_image_pixels: int = 64_000_000,
) -> FrameTransform:
    """The worker transform: the multi-crop augmentation (``augment_on="cpu"``; ``backend`` "fast" or "official",
    :func:`~surgenet_ssl.data.augment.multi_crop_class`; ``uint8_crops``: not normalised, DINOModule does it on the
    device), or decode + fit into ``frame_size`` only (``augment_on="gpu"``, :class:`FrameResize`: DINOModule makes
    the crops), or the JPEG bytes only (``decode="gpu"``, needs ``augment_on="gpu"``,
    :class:`~surgenet_ssl.data.gpu_decode.JpegBytes`: DINOModule decodes and crops)."""
    recipe = recipe_probabilities(recipe_from_crops(crops))  # dino.crops strengths/probabilities, checked at start
    if decode not in DECODE_MODES:
        raise ValueError(f"data.decode must be one of {DECODE_MODES}, got {decode!r}")
    if (
        decode == "gpu"
    ):  # workers ship JPEG bytes; DINOModule decodes them on the device (surgenet_ssl/data/gpu_decode.py)
        if augment_on != "gpu":
            raise ValueError(
                f"data.decode=gpu needs data.augment_on=gpu (got augment_on={augment_on!r}): the frames are decoded "
                "on the training device, so the crops must be made there too"
            )
        return JpegBytes(tuple(frame_size), crops["global_size"], max_image_pixels=max_image_pixels)
    if augment_on == "gpu":
        return FrameResize(frame_size=tuple(frame_size), global_crops_size=crops["global_size"])
    if augment_on != "cpu":
        raise ValueError(f"data.augment_on must be 'cpu' or 'gpu', got {augment_on!r}")
    return multi_crop_class(backend)(
        global_crops_size=crops["global_size"],
        local_crops_size=crops["local_size"],
        global_crops_scale=crops["global_scale"],
        local_crops_scale=crops["local_scale"],
        local_crops_number=crops["local_number"],
        uint8_output=uint8_crops,
        probabilities=recipe,
    )


def gpu_frame_size(setting: Any, mixture: ResolvedMixture) -> tuple[int, int]:
    """GPU mode's canvas ``(height, width)``: ``data.gpu_frame_size`` as given, or for ``auto`` the frame size the
    sources' manifests record (prepare counts the frames it writes per size) where they agree on the height:
    ``(that height, the widest frame)``, so that no frame is resized (narrower ones are padded). Otherwise (sizes
    not recorded, by a prepare older than this, or frames of several heights) the default
    :data:`~surgenet_ssl.data.augment.GPU_FRAME_SIZE`, with the reason logged."""
    if setting is None or str(setting) != "auto":
        return int(setting[0]), int(setting[1])
    unknown = [s.name for s in mixture.sources if not s.frame_sizes]
    sizes = {tuple(int(v) for v in k.split("x")) for s in mixture.sources for k in s.frame_sizes or {}}
    heights = {h for _, h in sizes}
    if not unknown and len(heights) == 1:
        canvas = (heights.pop(), max(w for w, _ in sizes))
        log.info("GPU mode canvas %dx%d (height x width): the frame sizes of the manifests", *canvas)
        return canvas
    why = (
        f"the manifests of {', '.join(unknown)} record no frame sizes (prepared before they were recorded)"
        if unknown
        else f"the sources' frames have several heights ({', '.join(str(h) for h in sorted(heights))} px)"
    )
    log.info("GPU mode canvas %dx%d (data.gpu_frame_size=auto's default): %s", *GPU_FRAME_SIZE, why)
    return GPU_FRAME_SIZE


def loader_options(data_cfg: dict, trainer: pl.Trainer | None) -> dict[str, Any]:
    """``pin_memory`` (``auto``: when training on CUDA), ``persistent_workers``, ``prefetch_factor`` from ``data``."""
    pin = data_cfg.get("pin_memory", "auto")
    if pin == "auto":
        pin = trainer is not None and trainer.strategy.root_device.type == "cuda"
    prefetch = data_cfg.get("prefetch_factor")
    return {
        "pin_memory": bool(pin),
        "persistent_workers": bool(data_cfg.get("persistent_workers", False)),
        "prefetch_factor": int(prefetch) if prefetch else None,
    }


# data.<key> -> MixtureStream keyword (sampling mode, shuffle and memory/cache/transfer bounds); absent keys keep the
# stream's defaults. Byte sizes are given in MiB (cache in GiB) in the config.
_STREAM_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "sampling": ("sampling", str),
    "shuffle_block": ("shuffle_block", int),
    "shuffle_buffer_mb": ("shuffle_buffer_bytes", lambda v: int(float(v) * (1 << 20))),
    "shard_cache_gb": ("shard_cache_bytes", lambda v: int(float(v) * (1 << 30))),
    "max_open_files": ("max_open_files", int),
    "max_transfers": ("max_transfers", int),
    "max_member_mb": ("max_member_bytes", lambda v: int(float(v) * (1 << 20))),
    "max_image_pixels": ("max_image_pixels", int),
    "max_consecutive_skips": ("max_consecutive_skips", int),
}


def stream_options(data_cfg: Any) -> dict[str, Any]:
    """The loader's sampling and bounds from the ``data`` config (see surgenet_ssl/configs/data/default.yaml)."""
    out = {}
    for key, (name, convert) in _STREAM_KEYS.items():
        value = data_cfg.get(key)
        if value is not None:
            out[name] = convert(value)
    return out


class StreamPosition:
    """Where the training loop stands in this rank's stream: per loader worker, the batches and stream items used
    up to the last batch the loop consumed (from the ``position`` each batch carries), not what the workers have
    prefetched. Checkpoints save it so a resumed run continues with exactly the next batch."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batches = 0
        self.workers: dict[int, list[int]] = {}

    def consumed(self, epoch: int, worker: int, worker_batches: int, samples: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches, self.workers = epoch, 0, {}
        self.batches += 1
        self.workers[worker] = [worker_batches, samples]

    def state(self, batches_per_epoch: int, num_workers: int) -> dict[str, Any]:
        """The position to resume from; ``num_workers`` of the loader (0: the stream runs in the training process)."""
        num_workers = max(1, num_workers)
        if self.batches >= batches_per_epoch:  # the epoch is complete: the next one starts from its beginning
            return {"epoch": self.epoch + 1, "batches": 0, "num_workers": num_workers, "workers": {}}
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "num_workers": num_workers,
            "workers": {w: list(v) for w, v in self.workers.items()},
        }


class StreamingDataModule(pl.LightningDataModule):
    def __init__(self, dataset: dict, data: dict, crops: dict, data_root: str, seed: int = 0) -> None:
        super().__init__()
        self.dataset_cfg, self.data_cfg, self.crops, self.data_root, self.seed = dataset, data, crops, data_root, seed
        self.position = StreamPosition()
        self._resume: dict[str, Any] | None = None
        self.curation: dict[str, Any] = {}  # source -> its curated view's summary, once the loader is built

    # ------------------------------------------------------------------------------------------ exact resume
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the position of every batch the training loop consumes (before it goes to the device)."""
        if isinstance(batch, dict) and "position" in batch:
            batch = dict(batch)
            epoch, worker, worker_batches, samples = batch.pop("position").tolist()
            self.position.consumed(epoch, worker, worker_batches, samples)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Every rank's stream position (gathered: Lightning writes rank 0's checkpoint only)."""
        trainer = self.trainer
        if trainer is None:
            return {}
        per_epoch = trainer.num_training_batches
        per_epoch = int(per_epoch) if per_epoch not in (None, float("inf")) else 1 << 62
        mine = self.position.state(per_epoch, int(self.data_cfg["num_workers"]))
        ranks = gather_from_ranks(mine, trainer.world_size)
        sampling = str(self.data_cfg.get("sampling") or "epoch")
        return {
            "stream_positions": ranks,
            "batch_size": int(self.data_cfg["batch_size"]),
            "seed": self.seed,
            "sampling": sampling,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        positions = state.get("stream_positions") or []
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if not positions:
            return
        same_layout = len(positions) == world and int(state.get("batch_size", -1)) == int(self.data_cfg["batch_size"])
        if not same_layout and state.get("sampling") == "epoch" == str(self.data_cfg.get("sampling") or "epoch"):
            # sampling=epoch: the epoch's global order does not depend on the layout; continue it at the position
            # the interrupted run had reached (every rank had consumed the same number of global batches).
            first = positions[0]
            done = max((int(v[1]) for v in (first.get("workers") or {}).values()), default=0)
            log.info(
                "the checkpoint's data stream was read by %d ranks with batch size %s; this run has %d ranks and "
                "batch size %s: epoch %d continues after its first %d frames (no frame repeated or skipped)",
                len(positions),
                state.get("batch_size"),
                world,
                self.data_cfg["batch_size"],
                int(first["epoch"]),
                done,
            )
            self._resume = {"epoch": int(first["epoch"]), "epoch_samples": done, "batches": 0, "workers": {}}
            self.position.epoch = int(first["epoch"])
            return
        if not same_layout:
            log.warning(
                "the checkpoint's data stream was read by %d ranks with batch size %s; this run has %d ranks and "
                "batch size %s: the data stream continues from the start of epoch %d, not from the exact batch",
                len(positions),
                state.get("batch_size"),
                world,
                self.data_cfg["batch_size"],
                positions[0]["epoch"],
            )
            self._resume = {"epoch": int(positions[0]["epoch"]), "batches": 0, "workers": {}}
            return
        self._resume = positions[rank]
        self.position.epoch = int(self._resume["epoch"])
        self.position.batches = int(self._resume["batches"])
        self.position.workers = {int(w): list(v) for w, v in (self._resume.get("workers") or {}).items()}

    def resumed_epoch_batches_done(self, steps_per_epoch: int) -> int | None:
        """For an elastic resume (another number of ranks or batch size, ``sampling=epoch``): how many of this
        layout's ``steps_per_epoch`` batches count as done in the resumed epoch, so that the training loop runs
        exactly the batches the loader has left (the rest of the epoch's frames). Lightning restores the batches
        done in the *old* layout's units, which ended the epoch early or at once (frames skipped). None otherwise."""
        resume = self._resume
        if not resume or resume.get("epoch_samples") is None:
            return None
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        g = int(self.data_cfg["batch_size"]) * world
        remaining = max(0, steps_per_epoch * g - int(resume["epoch_samples"])) // g
        return max(0, steps_per_epoch - remaining)

    def train_dataloader(self) -> DataLoader[Any]:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        on, backend = self.data_cfg.get("augment_on", "cpu"), self.data_cfg.get("augment_backend", "fast")
        temporal_p = float(self.crops.get("temporal_positive_p") or 0.0)
        if temporal_p > 0 and on == "gpu":
            raise ValueError(
                "dino.crops.temporal_positive_p > 0 needs data.augment_on=cpu: in GPU mode the crops are made on the "
                "device from one frame per sample"
            )
        if rank == 0:
            log.info(
                "multi-crop augmentation: %s",
                "on the training device (GPU mode)" if on == "gpu" else f"in the loader workers, {backend} backend",
            )
        mixture = resolve_mixture(self.dataset_cfg, self.data_root)
        frame_size = GPU_FRAME_SIZE
        if on == "gpu":
            frame_size = gpu_frame_size(self.data_cfg.get("gpu_frame_size", "auto"), mixture)
        loader = build_train_loader(
            self.dataset_cfg,
            self.data_root,
            transform=build_augmentation(
                self.crops,
                backend=backend,
                augment_on=on,
                frame_size=frame_size,
                uint8_crops=bool(self.data_cfg.get("uint8_crops", False)),
                decode=str(self.data_cfg.get("decode") or "cpu"),
                max_image_pixels=int(self.data_cfg.get("max_image_pixels") or 0),
            ),
            mixture=mixture,
            batch_size=int(self.data_cfg["batch_size"]),
            num_workers=int(self.data_cfg["num_workers"]),
            rank=rank,
            world_size=world,
            seed=self.seed,
            steps_per_epoch=self.data_cfg.get("steps_per_epoch"),
            shuffle_buffer=int(self.data_cfg.get("shuffle_buffer", 1000)),
            shard_cache_dir=self.data_cfg.get("shard_cache_dir"),
            **stream_options(self.data_cfg),
            **loader_options(self.data_cfg, trainer),
            # Lightning builds the first iterator before it restores the epoch counter: a resumed run starts at the
            # saved position (epoch and batch), a new one at epoch 0.
            epoch=int(self._resume["epoch"]) if self._resume else (trainer.current_epoch if trainer is not None else 0),
            resume_position=self._resume,
            temporal_positive_p=temporal_p,
            temporal_window_s=float(self.crops.get("temporal_window_s") or 2.0),
        )
        # what the model card records about the data: each source's curated view (dataset.curated)
        self.curation = {s.name: s.curation for s in mixture.sources if s.curation is not None}
        return loader

"""Streaming training loader: weighted mixture of per-source resampled shard streams -> ready batches.

Why it is built this way:
- **Resampled shards** (each worker draws shards at random, with replacement, frame-weighted): every rank and
  worker has an endless stream whatever the number of shards, so fewer shards than ranks x workers is fine.
- **Fixed epoch length**: an epoch is ``steps_per_epoch`` batches on *every* rank (default: frames of the mixture
  / global batch). Worker ``w`` of ``W`` yields exactly its share of the batches, so DDP ranks never wait on a
  rank that ran out of data.
- **Seeds** derive from (seed, epoch, rank, worker): reproducible, different per rank/worker, reshuffled per
  epoch via :meth:`MixtureStream.set_epoch` (or automatically on each new ``iter(loader)`` if it is not called).
- **Decorrelation**: several shards per source are read interleaved (frames of one video are consecutive in
  its shard), then a shuffle buffer of raw JPEG bytes; decoding happens after the buffer.
- **Start-up reads manifests only** (one JSON per source); shards are opened lazily inside the workers.
- **Bad data never stops training silently**: corrupt images, truncated or unreadable shards are skipped, logged
  with their path and counted in :attr:`MixtureStream.stats` (shared memory, summed over workers).
"""

from __future__ import annotations

import json
import logging
import random
import tarfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from surgenet_ssl.data.mixture import ResolvedMixture, SourceSpec, resolve_mixture
from surgenet_ssl.data.shards import iter_shard, keep_frame
from surgenet_ssl.data.video import decode_rgb_image

__all__ = ["MixtureStream", "build_train_loader", "STAT_NAMES"]

log = logging.getLogger(__name__)

STAT_NAMES = (
    "samples",  # frames delivered in batches
    "batches",
    "shards_opened",
    "corrupt_images",  # JPEG that could not be decoded (skipped)
    "truncated_shards",  # tar ended early or is damaged: the samples before the damage are used (once per worker)
    "unreadable_shards",  # missing file / not a tar: dropped from sampling (once per worker)
    "converted_images",  # not 3-channel colour (grayscale, RGBA, CMYK, ...): converted to RGB and used
    "upscaled_images",  # smaller than the global crop (or the GPU-mode frame size): upscaled and used
)
_STAT_INDEX = {n: i for i, n in enumerate(STAT_NAMES)}
_STAT_SLOTS = 64  # one counter row per worker id (modulo): no lost updates between processes
_LOG_FIRST = 10  # log each of the first N problems of a kind per worker, then every 100th


class _Counters:
    """Per-worker counters in shared memory (survive pickling to DataLoader workers)."""

    def __init__(self) -> None:
        self.table = torch.zeros(_STAT_SLOTS, len(STAT_NAMES), dtype=torch.int64).share_memory_()
        self.slot = 0

    def add(self, name: str, n: int = 1) -> int:
        self.table[self.slot, _STAT_INDEX[name]] += n
        return int(self.table[self.slot, _STAT_INDEX[name]])

    def totals(self) -> dict[str, int]:
        sums = self.table.sum(dim=0).tolist()
        return {n: int(v) for n, v in zip(STAT_NAMES, sums)}


class _SourceReader:
    """Endless stream of raw samples of one source: ``in_flight`` random shards read interleaved."""

    def __init__(
        self, spec: SourceSpec, fraction: float, rng: np.random.Generator, counters: _Counters, where: str,
        in_flight: int = 4,
    ) -> None:  # fmt: skip
        self.spec, self.fraction, self.rng, self.counters, self.where = spec, fraction, rng, counters, where
        self.frames = np.array([max(0, int(s.get("frames", 0))) for s in spec.shards], dtype=np.float64)
        self.cum = np.cumsum(self.frames / self.frames.sum())
        self.reported: set[int] = set()  # shards already reported as damaged (log and count once)
        self.in_flight = max(1, min(in_flight, len(spec.shards)))
        self.open: list[tuple[Iterator[tuple[str, dict[str, bytes]]], dict[str, Any], dict[str, int]]] = []
        self.opened_without_sample = 0
        self.delivered = 0

    def _keep(self, key: str) -> bool:
        return keep_frame(self.spec.name, key, self.fraction)

    def _open_one(self) -> None:
        i = min(int(np.searchsorted(self.cum, self.rng.random(), side="right")), len(self.spec.shards) - 1)
        shard = self.spec.shards[i]
        counts: dict[str, int] = {"keys": 0, "index": i}
        keep = self._keep if self.fraction < 1.0 else None
        it = iter_shard(self.spec.directory / shard["file"], keep=keep, counts=counts)
        self.counters.add("shards_opened")
        self.open.append((it, shard, counts))

    def _drop(self, i: int) -> None:
        """Never draw shard ``i`` again (unreadable)."""
        self.frames[i] = 0.0
        self.open = [o for o in self.open if o[2]["index"] != i]
        if self.frames.sum() <= 0:
            raise RuntimeError(
                f"Source {self.spec.name} ({self.spec.directory}): none of its {len(self.spec.shards)} shards can be "
                "read (see the warnings above). Check it with `python -m surgenet_ssl.datasets verify=true`, "
                "re-prepare it, or remove it from the mixture."
            )
        self.cum = np.cumsum(self.frames / self.frames.sum())
        self.in_flight = max(1, min(self.in_flight, int((self.frames > 0).sum())))

    def problem(self, stat: str, message: str, shard: int | None = None) -> None:
        if shard is not None:
            if shard in self.reported:
                return
            self.reported.add(shard)
        n = self.counters.add(stat)
        if n <= _LOG_FIRST or n % 100 == 0:
            log.warning("%s: %s [%s so far in this worker: %d]", self.where, message, stat.replace("_", " "), n)

    def next(self) -> tuple[str, dict[str, bytes]]:
        while True:
            while len(self.open) < self.in_flight:
                self._open_one()
            j = int(self.rng.integers(len(self.open)))
            it, shard, counts = self.open[j]
            path = self.spec.directory / shard["file"]
            try:
                key, sample = next(it)
                self.delivered += 1
                self.opened_without_sample = 0
                return key, sample
            except StopIteration:
                self.open.pop(j)
                expected = int(shard.get("frames", 0))
                if counts["keys"] < expected:
                    self.problem(
                        "truncated_shards",
                        f"shard {path} of source {self.spec.name} ended after {counts['keys']} of {expected} frames "
                        "(truncated); re-create it with `python -m surgenet_ssl.prepare` (delete the shard and "
                        "its .state record first)", counts["index"],
                    )  # fmt: skip
            except FileNotFoundError:
                self.open.pop(j)
                self.problem("unreadable_shards", f"shard {path} of source {self.spec.name} is missing; skipped",
                             counts["index"])  # fmt: skip
                self._drop(counts["index"])
            except (tarfile.TarError, OSError, EOFError) as e:
                self.open.pop(j)
                readable = counts["keys"] > 1  # the key being read when it broke does not count
                self.problem(
                    "truncated_shards" if readable else "unreadable_shards",
                    f"shard {path} of source {self.spec.name} is damaged after {max(0, counts['keys'] - 1)} frames "
                    f"({type(e).__name__}: {e}); " + ("using the frames before the damage" if readable else "skipped"),
                    counts["index"],
                )  # fmt: skip
                if not readable:
                    self._drop(counts["index"])
            self.opened_without_sample += 1
            if self.delivered == 0 and self.opened_without_sample > 4 * len(self.spec.shards) + 50:
                why = f" or fraction={self.fraction} keeps none of its {self.spec.frames} frames"
                raise RuntimeError(
                    f"Source {self.spec.name} ({self.spec.directory}) delivered no frame from "
                    f"{self.opened_without_sample} shard reads: its shards are missing/damaged"
                    + (why if self.fraction < 1 else "")
                    + ". Check it with `python -m surgenet_ssl.datasets verify=true`, re-prepare it, or remove it "
                    "from the mixture."
                )


class MixtureStream(IterableDataset):
    """IterableDataset of ready batches ``{"crops": [Tensor(B,3,h,w)], "source": LongTensor(B), "key": [str]}``.

    (``{"frames": uint8 Tensor(B,3,H,W), ...}`` instead when the transform's ``batch_key`` is "frames".)

    ``len()`` is the number of batches per epoch on each rank, the same on every rank.
    """

    def __init__(
        self,
        mixture: ResolvedMixture,
        transform: Callable[[Any], Any],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        steps_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        shards_in_flight: int = 4,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.mixture = mixture
        self.transform = transform
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.shuffle_buffer = max(0, int(shuffle_buffer))
        self.shards_in_flight = shards_in_flight
        self.sources: list[str] = [s.name for s in mixture.sources]
        self.frames_per_source: dict[str, int] = {s.name: s.expected_frames for s in mixture.sources}
        self.weights: dict[str, float] = {s.name: s.weight for s in mixture.sources}
        self.missing_sources: list[str] = [m.name for m in mixture.missing]
        total = sum(self.frames_per_source.values())
        if steps_per_epoch is None:
            steps_per_epoch = max(1, total // (batch_size * world_size))
        if int(steps_per_epoch) < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.steps_per_epoch = int(steps_per_epoch)
        self.epoch = 0
        self._epoch_explicit = False
        self._iterations = 0
        self._counters = _Counters()

    # ---------------------------------------------------------------------------------------------- public API
    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Reseed shuffling for ``epoch`` (call in the main process before iterating; workers see it)."""
        self.epoch = int(epoch)
        self._epoch_explicit = True

    @property
    def stats(self) -> dict[str, int]:
        """Counters summed over all workers of this rank since construction (skips included)."""
        return self._counters.totals()

    def describe(self) -> str:
        parts = [f"{n}: {self.frames_per_source[n]} frames, p={self.weights[n]:.3f}" for n in self.sources]
        return (
            f"dataset {self.mixture.name} (fraction {self.mixture.fraction:g}): {len(self.sources)} sources, "
            f"{sum(self.frames_per_source.values())} frames, {self.steps_per_epoch} steps/epoch of "
            f"{self.batch_size} x {self.world_size} ranks [" + "; ".join(parts) + "]"
        )

    # ---------------------------------------------------------------------------------------------- iteration
    def _batches_for_worker(self, worker: int, num_workers: int) -> int:
        base, extra = divmod(self.steps_per_epoch, num_workers)
        return base + (1 if worker < extra else 0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self._counters.slot = worker % _STAT_SLOTS
        seq = np.random.SeedSequence([self.seed, self.epoch, self.rank, worker, 0x5D6E])
        rng = np.random.default_rng(seq)
        if info is not None:
            # Augmentations (torch/random/numpy RNGs) differ per rank and worker and repeat with the seed. Only in
            # worker processes: with num_workers=0 the training process' RNG state is not ours to reset.
            aug_seed = int(seq.generate_state(1, dtype=np.uint32)[0])
            torch.manual_seed(aug_seed)
            random.seed(aug_seed)
            np.random.seed(aug_seed)
        where = f"rank {self.rank} worker {worker}"
        readers = [
            _SourceReader(s, self.mixture.fraction, np.random.default_rng(seq.spawn(1)[0]), self._counters,
                          where, self.shards_in_flight)
            for s in self.mixture.sources
        ]  # fmt: skip
        cum = np.cumsum([s.weight for s in self.mixture.sources])
        cum /= cum[-1]

        def raw_stream() -> Iterator[tuple[int, str, bytes]]:
            while True:
                i = min(int(np.searchsorted(cum, rng.random(), side="right")), len(readers) - 1)
                key, sample = readers[i].next()
                if "jpg" not in sample:
                    readers[i].problem("corrupt_images", f"sample {key} has no .jpg member; skipped")
                    continue
                yield i, f"{readers[i].spec.name}/{key}", sample["jpg"]

        def shuffled() -> Iterator[tuple[int, str, bytes]]:
            stream = raw_stream()
            if self.shuffle_buffer <= 1:
                yield from stream
                return
            buf: list[tuple[int, str, bytes]] = []
            for item in stream:
                if len(buf) < self.shuffle_buffer:
                    buf.append(item)
                    continue
                j = int(rng.integers(len(buf)))
                buf[j], item = item, buf[j]
                yield item

        stream = shuffled()
        # Transforms may decode themselves (e.g. reduced-size JPEG decoding) and report conversions/upscales.
        decode = getattr(self.transform, "decode", decode_rgb_image)
        consume_events = getattr(self.transform, "consume_events", None)
        batch_key = getattr(self.transform, "batch_key", "crops")  # "frames": uint8 frames for GPU augmentation
        for _ in range(self._batches_for_worker(worker, num_workers)):
            crops_per_sample: list[list[torch.Tensor]] = []
            labels: list[int] = []
            keys: list[str] = []
            while len(keys) < self.batch_size:
                i, key, jpg = next(stream)
                try:
                    img = decode(jpg)
                except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt data
                    readers[i].problem("corrupt_images", f"corrupt image {key} ({type(e).__name__}: {e}); skipped")
                    continue
                try:
                    out = self.transform(img)
                except Exception as e:  # a bug in the transform, not bad data: fail loudly, naming the frame
                    size = img.size if hasattr(img, "mode") else getattr(img, "shape", "?")
                    raise RuntimeError(f"transform failed on frame {key} (size {size}): {e}") from e
                if consume_events is not None:
                    for name, n in consume_events().items():
                        self._counters.add(name, n)
                crops_per_sample.append(list(out) if isinstance(out, (list, tuple)) else [out])
                labels.append(i)
                keys.append(key)
            n_crops = {len(c) for c in crops_per_sample}
            if len(n_crops) != 1:
                raise RuntimeError(f"transform returned different numbers of crops in one batch: {sorted(n_crops)}")
            crops = [torch.stack([c[k] for c in crops_per_sample]) for k in range(n_crops.pop())]
            self._counters.add("samples", len(keys))
            self._counters.add("batches")
            batch: dict[str, Any] = {"crops": crops} if batch_key == "crops" else {batch_key: crops[0]}
            yield {**batch, "source": torch.tensor(labels, dtype=torch.long), "key": keys}


class _EpochLoader(DataLoader):
    """DataLoader that advances the stream's epoch on each new iteration unless ``set_epoch`` was called."""

    def __iter__(self):  # type: ignore[override]
        ds = self.dataset
        if isinstance(ds, MixtureStream):
            if not ds._epoch_explicit and ds._iterations > 0:
                ds.epoch += 1
            ds._epoch_explicit = False
            ds._iterations += 1
        return super().__iter__()


def build_train_loader(
    dataset_cfg: Mapping[str, Any],
    data_root: str | Path,
    transform: Callable[[Any], Any],
    batch_size: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    steps_per_epoch: int | None = None,
    shuffle_buffer: int = 1000,
    shards_in_flight: int = 4,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    epoch: int | None = None,
) -> DataLoader:
    """The training DataLoader of a ``dataset`` config (see surgenet_ssl.data.mixture for the schema).

    Reads the sources' manifests only; raises :class:`~surgenet_ssl.data.mixture.MissingSourcesError` listing
    every missing source unless ``dataset.allow_missing`` is true. ``len(loader)`` = steps per epoch (identical on
    every rank). ``loader.dataset`` is the :class:`MixtureStream` (``sources``, ``frames_per_source``,
    ``steps_per_epoch``, ``stats``, ``set_epoch``). ``epoch`` seeds the first iteration (pass the resumed epoch:
    Lightning creates the first iterator before ``on_train_epoch_start``).
    """
    mixture = resolve_mixture(dataset_cfg, data_root)
    stream = MixtureStream(
        mixture, transform, batch_size, rank=rank, world_size=world_size, seed=seed,
        steps_per_epoch=steps_per_epoch, shuffle_buffer=shuffle_buffer, shards_in_flight=shards_in_flight,
    )  # fmt: skip
    if epoch is not None:
        stream.set_epoch(epoch)
    if rank == 0:
        log.info("%s", stream.describe())
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    kwargs: dict[str, Any] = {}
    if num_workers > 0 and prefetch_factor is not None:
        kwargs["prefetch_factor"] = prefetch_factor
    return _EpochLoader(
        stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False, **kwargs
    )


def read_sample_metadata(sample: Mapping[str, bytes]) -> dict[str, Any]:
    """The per-frame metadata (source, procedure, video, frame_index, timestamp, ...) of a raw shard sample."""
    return json.loads(sample["json"]) if "json" in sample else {}

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
- **Shards from anywhere**: sources may live at URLs (surgenet_ssl.data.location); remote shards are streamed
  without a local copy, or kept in ``shard_cache_dir`` once read completely. A 404 is an unreadable shard and a
  transfer cut mid-way a truncated one, exactly like a missing or truncated local file.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import random
import tarfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from surgenet_ssl.data import location as L
from surgenet_ssl.data.decode import decode_rgb_image, set_max_pixels
from surgenet_ssl.data.epochs import Catalog, epoch_order, epoch_steps, rank_batch_positions
from surgenet_ssl.data.mixture import ResolvedMixture, SourceSpec, resolve_mixture
from surgenet_ssl.data.shard_store import OpenShard, ShardStore
from surgenet_ssl.data.shards import keep_frame
from surgenet_ssl.runtime.cluster import ignore_preemption_signals_in_worker
from surgenet_ssl.runtime.resources import limit_worker_threads, single_threaded_opencv_fork

__all__ = ["MixtureStream", "build_train_loader", "STAT_NAMES", "SAMPLING_MODES"]

SAMPLING_MODES = ("epoch", "resampled")

log = logging.getLogger(__name__)

STAT_NAMES = (
    "samples",  # frames delivered in batches
    "batches",
    "shards_opened",
    "corrupt_images",  # JPEG that could not be decoded (skipped)
    "truncated_shards",  # tar ended early or is damaged: the samples before the damage are used (once per worker)
    "unreadable_shards",  # missing file / not a tar: dropped from sampling (once per worker)
    "oversized_members",  # a shard member over data.max_member_bytes: skipped before it is read
    "converted_images",  # not 3-channel colour (grayscale, RGBA, CMYK, ...): converted to RGB and used
    "upscaled_images",  # smaller than the global crop (or the GPU-mode frame size): upscaled and used
    "temporal_positives",  # samples whose second global crop came from a neighbouring frame (temporal_positive_p)
)
_STAT_INDEX = {n: i for i, n in enumerate(STAT_NAMES)}
_STAT_SLOTS = 64  # one counter row per worker id (modulo): no lost updates between processes
_LOG_FIRST = 10  # log each of the first N problems of a kind per worker, then every 100th


class _Counters:
    """Per-worker counters in shared memory (survive pickling to DataLoader workers)."""

    def __init__(self) -> None:
        # one more row for the training process (data.decode=gpu counts the frames the device could not decode)
        self.table = torch.zeros(_STAT_SLOTS + 1, len(STAT_NAMES), dtype=torch.int64).share_memory_()
        self.slot = 0

    def add(self, name: str, n: int = 1) -> int:
        self.table[self.slot, _STAT_INDEX[name]] += n
        return int(self.table[self.slot, _STAT_INDEX[name]])

    def totals(self) -> dict[str, int]:
        sums = self.table.sum(dim=0).tolist()
        return {n: int(v) for n, v in zip(STAT_NAMES, sums, strict=True)}


class _SkipGuard:
    """Stops the run when a source's last ``limit`` frames were all unusable (every frame corrupt, every shard
    damaged): without it such a source makes training skip forever without a step."""

    def __init__(self, names: list[str], directories: list[Any], limit: int) -> None:
        self.names, self.directories, self.limit = names, directories, max(1, int(limit))
        self.run = [0] * len(names)

    def ok(self, source: int) -> None:
        self.run[source] = 0

    def failed(self, source: int, where: str) -> None:
        self.run[source] += 1
        if self.run[source] >= self.limit:
            raise RuntimeError(
                f"Source {self.names[source]} ({self.directories[source]}): the last {self.run[source]} frames read "
                f"from it in {where} were all unusable (corrupt images, missing, damaged or oversized shard members; "
                "see the warnings above), data.max_consecutive_skips="
                f"{self.limit}. Check it with `python -m surgenet_ssl.datasets verify=true`, re-prepare it, or remove "
                "it from the mixture."
            )


class _Problems:
    """Logs and counts bad data: each damaged shard once per worker, other problems the first N times, then every
    100th."""

    def __init__(self, counters: _Counters, where: str) -> None:
        self.counters, self.where = counters, where
        self.reported: set[str] = set()

    def __call__(self, stat: str, message: str, shard: str | None = None) -> None:
        if shard is not None:
            if shard in self.reported:
                return
            self.reported.add(shard)
        n = self.counters.add(stat)
        if n <= _LOG_FIRST or n % 100 == 0:
            log.warning("%s: %s [%s so far in this worker: %d]", self.where, message, stat.replace("_", " "), n)


def _open_shard(
    store: ShardStore, spec: SourceSpec, shard: Mapping[str, Any], problems: _Problems, tag: str
) -> OpenShard | None:
    """Open a shard of ``spec`` (None if it cannot be read: logged and counted once); reports a truncated one."""
    path = L.join(spec.directory, shard["file"])
    try:
        entry = store.open(path, size=shard.get("bytes"), sha256=shard.get("sha256"))
    except FileNotFoundError as e:
        why = f" ({getattr(e, 'reason', e)})" if L.is_url(path) else ""  # e.g. an HTTP 404
        problems("unreadable_shards", f"shard {path} of source {spec.name} is missing{why}; skipped", tag)
        return None
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        why = getattr(e, "reason", None) or f"{type(e).__name__}: {e}"  # a remote read names its tool's error
        problems(
            "unreadable_shards", f"shard {path} of source {spec.name} is damaged after 0 frames ({why}); skipped", tag
        )
        return None
    n, expected = len(entry.index), int(shard.get("frames", 0))
    if n == 0:
        problems("unreadable_shards", f"shard {path} of source {spec.name} holds no sample (not a tar?); skipped", tag)
        return None
    if not entry.index.complete:
        problems(
            "truncated_shards",
            f"shard {path} of source {spec.name} is damaged after {n} frames "
            f"({entry.damage or 'the tar ends inside a member'}); using the frames before the damage",
            tag,
        )
    elif n < expected:
        problems(
            "truncated_shards",
            f"shard {path} of source {spec.name} ended after {n} of {expected} frames (truncated); re-create it with "
            "`python -m surgenet_ssl.prepare` (delete the shard and its .state record first)",
            tag,
        )
    return entry


class _SourceReader:
    """Endless stream of raw samples of one source (``sampling=resampled``): ``in_flight`` shards drawn at random
    (weighted by frames, with replacement) read interleaved, each from a random sample on, wrapping around (a
    rotation), so no part of a shard is favoured."""

    def __init__(
        self,
        spec: SourceSpec,
        fraction: float,
        rng: np.random.Generator,
        problems: _Problems,
        store: ShardStore,
        in_flight: int = 4,
        max_member_bytes: int = 0,
    ) -> None:
        self.spec, self.fraction, self.rng, self.problem, self.store = spec, fraction, rng, problems, store
        self.max_member_bytes = max_member_bytes
        # dataset.curated: the view's kept ordinals per shard (drawn by their count, others skipped unread)
        self.curated = [set(spec.kept[s["file"]].tolist()) for s in spec.shards] if spec.kept is not None else None
        self.frames = np.array(
            [len(c) for c in self.curated]
            if self.curated is not None
            else [max(0, int(s.get("frames", 0))) for s in spec.shards],
            dtype=np.float64,
        )
        self.cum = np.cumsum(self.frames / self.frames.sum())
        self.in_flight = max(1, min(in_flight, len(spec.shards)))
        self.open: list[tuple[int, Iterator[int]]] = []
        self.opened_without_sample = 0
        self.delivered = 0

    def _open_one(self) -> None:
        i = min(int(np.searchsorted(self.cum, self.rng.random(), side="right")), len(self.spec.shards) - 1)
        self.problem.counters.add("shards_opened")
        entry = _open_shard(self.store, self.spec, self.spec.shards[i], self.problem, f"{self.spec.name}:{i}")
        if entry is None:
            self._drop(i)
            self.opened_without_sample += 1
            return
        n = len(entry.index)
        start = int(self.rng.integers(n))
        self.open.append((i, itertools.chain(range(start, n), range(start))))

    def _drop(self, i: int) -> None:
        """Never draw shard ``i`` again (unreadable)."""
        self.frames[i] = 0.0
        self.open = [o for o in self.open if o[0] != i]
        if self.frames.sum() <= 0:
            raise RuntimeError(
                f"Source {self.spec.name} ({self.spec.directory}): none of its {len(self.spec.shards)} shards can be "
                "read (see the warnings above). Check it with `python -m surgenet_ssl.datasets verify=true`, "
                "re-prepare it, or remove it from the mixture."
            )
        self.cum = np.cumsum(self.frames / self.frames.sum())
        self.in_flight = max(1, min(self.in_flight, int((self.frames > 0).sum())))

    def next(self) -> tuple[str, dict[str, bytes]]:
        while True:
            while len(self.open) < self.in_flight:
                self._open_one()
                self._check_progress()
            j = int(self.rng.integers(len(self.open)))
            i, order = self.open[j]
            k = next(order, None)
            if k is None:
                self.open.pop(j)
                self.opened_without_sample += 1
                self._check_progress()
                continue
            shard = self.spec.shards[i]
            entry = _open_shard(self.store, self.spec, shard, self.problem, f"{self.spec.name}:{i}")
            if entry is None:
                self._drop(i)
                continue
            key = entry.index.keys[k]
            if self.curated is not None and k not in self.curated[i]:
                continue
            if self.fraction < 1.0 and not keep_frame(self.spec.name, key, self.fraction):
                continue
            if self.max_member_bytes and entry.index.largest_member(k) > self.max_member_bytes:
                self.problem("oversized_members", _oversized(self.spec.name, key, entry.index.largest_member(k), self))
                continue
            try:
                sample = entry.read(k, ("jpg", "json"))
            except (OSError, EOFError) as e:
                path = L.join(self.spec.directory, shard["file"])
                self.problem(
                    "truncated_shards", f"shard {path} of source {self.spec.name}: {e}", f"{self.spec.name}:{i}"
                )
                self.open.pop(j)
                continue
            self.delivered += 1
            self.opened_without_sample = 0
            return key, sample

    def _check_progress(self) -> None:
        if self.delivered == 0 and self.opened_without_sample > 4 * len(self.spec.shards) + 50:
            why = f" or fraction={self.fraction} keeps none of its {self.spec.frames} frames"
            raise RuntimeError(
                f"Source {self.spec.name} ({self.spec.directory}) delivered no frame from "
                f"{self.opened_without_sample} shard reads: its shards are missing/damaged"
                + (why if self.fraction < 1 else "")
                + ". Check it with `python -m surgenet_ssl.datasets verify=true`, re-prepare it, or remove it "
                "from the mixture."
            )


def stack_crops(crops: list[torch.Tensor]) -> torch.Tensor:
    """One crop position of a batch -> (B, 3, h, w). Channel-last crops (the fast backend's (3, h, w) views of
    HxWx3 arrays) stay channel-last: ``torch.stack`` would otherwise do the channel-first copy here, on the CPU,
    which the training module does on the device (``DINOModule.on_after_batch_transfer``)."""
    if crops[0].ndim == 3 and crops[0].permute(1, 2, 0).is_contiguous():
        return torch.stack([c.permute(1, 2, 0) for c in crops]).permute(0, 3, 1, 2)
    return torch.stack(crops)


def _oversized(source: str, key: str, size: int, owner: Any) -> str:
    return (
        f"frame {source}/{key} has a member of {size} bytes, over data.max_member_bytes={owner.max_member_bytes}; "
        "skipped without reading it"
    )


class MixtureStream(IterableDataset):
    """IterableDataset of ready batches ``{"crops": [Tensor(B,3,h,w)], "source": LongTensor(B), "key": [str]}``.

    (``{"frames": uint8 Tensor(B,3,H,W), "frame_hw": Tensor(B,2), ...}`` instead when the transform's
    ``batch_key`` is "frames": GPU augmentation mode, each frame's valid size in its padded canvas.)

    ``len()`` is the number of batches per epoch on each rank, the same on every rank. ``sampling="epoch"``: each
    epoch is a seeded global order of the mixture's frames (surgenet_ssl.data.epochs); ``"resampled"``: endless
    per-source streams of shards drawn with replacement, through a shuffle buffer.
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
        shard_cache_dir: str | Path | None = None,
        sampling: str = "epoch",
        shuffle_block: int = 1 << 16,
        shuffle_buffer_bytes: int = 256 << 20,
        shard_cache_bytes: int = 16 << 30,
        max_open_files: int = 64,
        max_transfers: int = 4,
        max_member_bytes: int = 64 << 20,
        max_image_pixels: int = 64_000_000,
        max_consecutive_skips: int = 1000,
        temporal_positive_p: float = 0.0,
        temporal_window_s: float = 2.0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"data.sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        if int(max_transfers) < 1 or int(max_open_files) < 1 or int(shuffle_block) < 1:
            raise ValueError(
                "data.max_transfers, data.max_open_files and data.shuffle_block must be >= 1, got "
                f"{max_transfers}, {max_open_files}, {shuffle_block}"
            )
        if not 0.0 <= float(temporal_positive_p) <= 1.0 or float(temporal_window_s) <= 0:
            raise ValueError(
                "dino.crops.temporal_positive_p must be in [0, 1] and temporal_window_s > 0, got "
                f"{temporal_positive_p}, {temporal_window_s}"
            )
        if temporal_positive_p > 0 and sampling != "epoch":
            raise ValueError(
                "dino.crops.temporal_positive_p > 0 needs data.sampling=epoch (neighbours are found through the "
                "shard index of the frame's own shard)"
            )
        self.temporal_positive_p, self.temporal_window_s = float(temporal_positive_p), float(temporal_window_s)
        self.mixture = mixture
        self.transform = transform
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.sampling = sampling
        self.shuffle_buffer = max(0, int(shuffle_buffer))
        self.shuffle_buffer_bytes = max(0, int(shuffle_buffer_bytes))
        self.shards_in_flight = shards_in_flight
        self.shard_cache_dir = str(Path(shard_cache_dir).expanduser()) if shard_cache_dir else None
        self.shuffle_block = int(shuffle_block)
        self.shard_cache_bytes, self.max_open_files = int(shard_cache_bytes), int(max_open_files)
        self.max_transfers, self.max_member_bytes = int(max_transfers), max(0, int(max_member_bytes))
        self.max_image_pixels, self.max_consecutive_skips = int(max_image_pixels), int(max_consecutive_skips)
        self.sources: list[str] = [s.name for s in mixture.sources]
        self.frames_per_source: dict[str, int] = {s.name: s.expected_frames for s in mixture.sources}
        self.weights: dict[str, float] = {s.name: s.weight for s in mixture.sources}
        self.missing_sources: list[str] = [m.name for m in mixture.missing]
        self._counters = _Counters()
        self.catalog: Catalog | None = None
        total = sum(self.frames_per_source.values())
        if sampling == "epoch":
            self.catalog = self._build_catalog()
            total = self.catalog.epoch_size()
            self.repeats = dict(zip(self.sources, self.catalog.repeats, strict=True))
        if self.temporal_positive_p > 0:
            unknown = [s.name for s in mixture.sources if s.sample_fps is None]
            if unknown:
                log.warning(
                    "temporal positives: sources %s were prepared with fps=null (every frame), so the time between "
                    "their frames is unknown; their second global crop stays on the same frame",
                    ", ".join(unknown),
                )
        if steps_per_epoch is not None and int(steps_per_epoch) < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.epoch_frames = total
        self.steps_per_epoch = epoch_steps(total, batch_size, world_size, steps_per_epoch)
        # In shared memory, so persistent workers (which keep their copy of this object) see set_epoch too.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._epoch_explicit = False
        self._iterations = 0
        # Where a resumed run continues: {"epoch", "batches", "num_workers", "workers": {w: [batches, samples]}}
        # (sampling=epoch: samples = the epoch's global position after that batch), or {"epoch", "epoch_samples"}.
        self.resume_position: dict[str, Any] | None = None

    def _store(self) -> ShardStore:
        return ShardStore(self.shard_cache_dir, self.shard_cache_bytes, self.max_open_files, self.max_transfers)

    def _build_catalog(self) -> Catalog:
        """The frames of an epoch. Fraction 1: the manifests' counts (no shard is read). Fraction < 1: the kept keys
        of each shard, from its index (prepare's sidecar, a cached one, or its headers; remote shards are fetched)."""
        source_of: list[int] = []
        frames: list[int] = []
        kept: list[np.ndarray | None] = []
        fraction = self.mixture.fraction
        store = self._store() if fraction < 1.0 else None
        problems = _Problems(self._counters, f"rank {self.rank} (planning the epoch)")
        try:
            for s, spec in enumerate(self.mixture.sources):
                for j, shard in enumerate(spec.shards):
                    source_of.append(s)
                    curated = spec.kept[shard["file"]] if spec.kept is not None else None  # dataset.curated
                    if store is None:
                        frames.append(len(curated) if curated is not None else max(0, int(shard.get("frames", 0))))
                        kept.append(curated)
                        continue
                    entry = _open_shard(store, spec, shard, problems, f"{spec.name}:{j}")
                    keys = entry.index.keys if entry is not None else []
                    candidates = range(len(keys)) if curated is None else [int(k) for k in curated if k < len(keys)]
                    ordinals = np.array(
                        [k for k in candidates if keep_frame(spec.name, keys[k], fraction)], dtype=np.int64
                    )
                    frames.append(len(ordinals))
                    kept.append(ordinals)
        finally:
            if store is not None:
                store.close()
        per_source = np.bincount(source_of, weights=frames, minlength=len(self.mixture.sources))
        total = float(per_source.sum())
        # Weight shares -> repeat factors: the epoch keeps the mixture's size and each source's share of it.
        # Without weights (proportional to frames) every frame is used once.
        repeats = [
            (float(spec.weight * total / n) if self.mixture.weighted else 1.0) if n > 0 else 0.0
            for spec, n in zip(self.mixture.sources, per_source, strict=True)
        ]
        return Catalog(np.array(source_of, dtype=np.int64), np.array(frames, dtype=np.int64), kept, repeats)

    # ---------------------------------------------------------------------------------------------- public API
    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.fill_(int(value))

    def set_epoch(self, epoch: int) -> None:
        """Reseed shuffling for ``epoch`` (call in the main process before iterating; workers see it)."""
        self.epoch = int(epoch)
        self._epoch_explicit = True

    def resume_at(self, position: Mapping[str, Any] | None) -> None:
        """Continue the stream where an interrupted run stood (a position from :class:`StreamPosition`): the next
        iteration of that epoch yields exactly the batches, in the order, that the interrupted run had not used."""
        self.resume_position = dict(position) if position else None
        if position:
            self.set_epoch(int(position["epoch"]))

    @property
    def stats(self) -> dict[str, int]:
        """Counters summed over all workers of this rank since construction (skips included)."""
        return self._counters.totals()

    def count_in_training_process(self, name: str, n: int = 1) -> None:
        """Add to a counter from the training process (its own row: no lost updates with the workers'), e.g. the
        frames ``data.decode=gpu`` could not decode on the device."""
        self._counters.table[_STAT_SLOTS, _STAT_INDEX[name]] += n

    def describe(self) -> str:
        if self.sampling == "epoch":
            parts = [f"{n}: {self.frames_per_source[n]} frames, x{self.repeats[n]:.3g}" for n in self.sources]
            how = f"epochs of {self.epoch_frames} frames in a global order (shuffle block {self.shuffle_block})"
        else:
            parts = [f"{n}: {self.frames_per_source[n]} frames, p={self.weights[n]:.3f}" for n in self.sources]
            how = "resampled shards"
        return (
            f"dataset {self.mixture.name} (fraction {self.mixture.fraction:g}): {len(self.sources)} sources, "
            f"{sum(self.frames_per_source.values())} frames, {how}, {self.steps_per_epoch} steps/epoch of "
            f"{self.batch_size} x {self.world_size} ranks [" + "; ".join(parts) + "]"
        )

    # ---------------------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        resume = self.resume_position if (self.resume_position or {}).get("epoch") == epoch else None
        if info is not None:
            limit_worker_threads()  # each worker is one of the process' cores: no torch/OpenCV thread pools
        set_max_pixels(self.max_image_pixels)
        if self.sampling == "epoch":
            return self._epoch_batches(epoch, physical, num_workers, resume, main_process=info is None)
        plan = worker_plan(self.steps_per_epoch, num_workers, physical, resume)
        return self._batches(epoch, plan, main_process=info is None)

    def _epoch_batches(
        self, epoch: int, worker: int, num_workers: int, resume: Mapping[str, Any] | None, main_process: bool
    ) -> Iterator[dict[str, Any]]:
        """This worker's batches of the epoch: rank batches ``worker, worker + num_workers, ...`` of the epoch's
        global order, continued from the resumed position if any."""
        assert self.catalog is not None
        self._counters.slot = worker % _STAT_SLOTS
        order = epoch_order(self.catalog, self.seed, epoch, self.shuffle_block)
        g = self.batch_size * self.world_size
        offset = resumed_samples(resume)
        remaining = max(0, self.steps_per_epoch * g - offset) // g
        where = f"rank {self.rank} worker {worker}"
        reader = _EpochReader(self, order, epoch, where)
        mine = range(worker, remaining, num_workers)
        try:
            for n, t in enumerate(mine):
                positions = rank_batch_positions(offset, t, self.rank, self.world_size, self.batch_size)
                reader.prefetch(
                    [
                        rank_batch_positions(offset, u, self.rank, self.world_size, self.batch_size)
                        for u in mine[n + 1 : n + 3]
                    ]
                )
                first = positions[0]
                batch_seed = int(np.random.SeedSequence([self.seed, epoch, first, 0xA06]).generate_state(1)[0])
                with _seeded_randomness(batch_seed, restore=main_process):
                    batch = self._epoch_batch(reader, positions)
                batch["position"] = torch.tensor([epoch, worker, n + 1, offset + (t + 1) * g], dtype=torch.long)
                yield batch
        finally:
            reader.close()

    def _epoch_batch(self, reader: _EpochReader, positions: range) -> dict[str, Any]:
        consume_events = getattr(self.transform, "consume_events", None)
        outs: list[Any] = []
        labels: list[int] = []
        keys: list[str] = []
        for p in positions:
            source, key, img = reader.frame(p)
            second = reader.neighbour(p) if self.temporal_positive_p > 0 else None
            outs.append(self._transform(img, key, consume_events, second))
            labels.append(source)
            keys.append(key)
        return self._collate(outs, labels, keys)

    def _transform(self, img: Any, key: str, consume_events: Any, second: Any = None) -> Any:
        try:
            out = self.transform(img) if second is None else self.transform(img, second=second)  # type: ignore[call-arg]
        except Exception as e:  # a bug in the transform, not bad data: fail loudly, naming the frame
            size = img.size if hasattr(img, "mode") else getattr(img, "shape", "?")
            raise RuntimeError(f"transform failed on frame {key} (size {size}): {e}") from e
        if consume_events is not None:
            for name, n in consume_events().items():
                self._counters.add(name, n)
        return out

    def _collate(self, outs: list[Any], labels: list[int], keys: list[str]) -> dict[str, Any]:
        batch_key = getattr(self.transform, "batch_key", "crops")  # "frames": uint8 frames for GPU augmentation
        if batch_key == "jpeg":  # data.decode=gpu: each frame's JPEG bytes (1-D uint8), decoded on the device
            self._counters.add("samples", len(keys))
            self._counters.add("batches")
            canvas = torch.tensor(self.transform.frame_size, dtype=torch.int32)  # type: ignore[attr-defined]
            return {
                "jpeg": list(outs),
                "canvas_hw": canvas,
                "source": torch.tensor(labels, dtype=torch.long),
                "key": keys,
            }
        crops_per_sample = [list(o) if isinstance(o, (list, tuple)) else [o] for o in outs]
        n_crops = {len(c) for c in crops_per_sample}
        if len(n_crops) != 1:
            raise RuntimeError(f"transform returned different numbers of crops in one batch: {sorted(n_crops)}")
        crops = [stack_crops([c[k] for c in crops_per_sample]) for k in range(n_crops.pop())]
        self._counters.add("samples", len(keys))
        self._counters.add("batches")
        keys_out = getattr(self.transform, "batch_keys", (batch_key,))  # GPU mode: ("frames", "frame_hw")
        batch: dict[str, Any] = {"crops": crops} if batch_key == "crops" else dict(zip(keys_out, crops, strict=False))
        return {**batch, "source": torch.tensor(labels, dtype=torch.long), "key": keys}

    def _batches(self, epoch: int, plan: WorkerPlan, main_process: bool) -> Iterator[dict[str, Any]]:
        worker = plan.worker
        self._counters.slot = worker % _STAT_SLOTS
        seq = np.random.SeedSequence([self.seed, epoch, self.rank, worker, 0x5D6E])
        rng = np.random.default_rng(seq)
        problems = _Problems(self._counters, f"rank {self.rank} worker {worker}")
        store = self._store()
        readers = [
            _SourceReader(
                s,
                self.mixture.fraction,
                np.random.default_rng(seq.spawn(1)[0]),
                problems,
                store,
                self.shards_in_flight,
                self.max_member_bytes,
            )
            for s in self.mixture.sources
        ]
        guard = _SkipGuard(self.sources, [s.directory for s in self.mixture.sources], self.max_consecutive_skips)
        stream = shuffle_buffer(
            sample_stream(readers, [s.weight for s in self.mixture.sources], rng, guard),
            self.shuffle_buffer,
            rng,
            max_bytes=self.shuffle_buffer_bytes,
        )
        raw = 0
        try:
            for _ in range(plan.skip_samples):  # resume: replay the stream up to where the interrupted run stood
                next(stream)
                raw += 1
            for index in range(plan.first_batch, plan.batches):
                # Augmentation randomness is seeded per batch from (seed, epoch, rank, worker, batch): a resumed run
                # makes the same crops without replaying the ones before. In the training process (num_workers=0) the
                # global random state is put back afterwards: it is not the loader's.
                batch_seed = int(
                    np.random.SeedSequence([self.seed, epoch, self.rank, worker, index, 0xA06]).generate_state(1)[0]
                )
                with _seeded_randomness(batch_seed, restore=main_process):
                    batch, used = self._make_batch(stream, readers, guard, problems)
                raw += used
                batch["position"] = torch.tensor([epoch, worker, index + 1, raw], dtype=torch.long)
                yield batch
        finally:
            store.close()

    def _make_batch(
        self,
        stream: Iterator[tuple[int, str, bytes]],
        readers: list[_SourceReader],
        guard: _SkipGuard,
        problems: _Problems,
    ) -> tuple[dict[str, Any], int]:
        """One batch from the stream; returns it and the number of stream items it used (corrupt ones included)."""
        # Transforms may decode themselves (e.g. reduced-size JPEG decoding) and report conversions/upscales.
        decode = getattr(self.transform, "decode", decode_rgb_image)
        consume_events = getattr(self.transform, "consume_events", None)
        outs: list[Any] = []
        labels: list[int] = []
        keys: list[str] = []
        used = 0
        while len(keys) < self.batch_size:
            i, key, jpg = next(stream)
            used += 1
            try:
                img = decode(jpg)
            except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt data
                problems("corrupt_images", f"corrupt image {key} ({type(e).__name__}: {e}); skipped")
                guard.failed(i, problems.where)
                continue
            guard.ok(i)
            outs.append(self._transform(img, key, consume_events))
            labels.append(i)
            keys.append(key)
        return self._collate(outs, labels, keys), used


class _EpochReader:
    """Reads the frames at global positions of the epoch's order (``sampling=epoch``) in one worker. A frame that
    cannot be used (corrupt, in a missing or damaged shard, oversized) is logged, counted and replaced by a frame of
    the same source drawn from (seed, epoch, position, attempt): deterministic, so a resumed run makes the same
    batches."""

    def __init__(self, stream: MixtureStream, order: np.ndarray, epoch: int, where: str) -> None:
        assert stream.catalog is not None
        self.stream, self.catalog, self.order, self.epoch = stream, stream.catalog, order, epoch
        self.shards = [(s, spec, shard) for s, spec in enumerate(stream.mixture.sources) for shard in spec.shards]
        self.store = stream._store()
        self.problems = _Problems(stream._counters, where)
        self.guard = _SkipGuard(
            stream.sources, [s.directory for s in stream.mixture.sources], stream.max_consecutive_skips
        )
        self.bad: set[int] = set()
        self.decode = getattr(stream.transform, "decode", decode_rgb_image)
        self.last: tuple[int, int] = (-1, -1)  # (global shard, ordinal) of the frame frame() returned last

    def close(self) -> None:
        self.store.close()

    def _flat(self, p: int) -> int:
        return int(self.order[p % len(self.order)])

    def prefetch(self, batches: list[range]) -> None:
        """Start fetching the remote shards of the next batches (at most ``max_transfers`` at once)."""
        wanted: dict[str, tuple[str, int | None, str | None]] = {}
        for positions in batches:
            for p in positions:
                j, _ = self.catalog.locate(self._flat(p))
                _, spec, shard = self.shards[j]
                path = L.join(spec.directory, shard["file"])
                if j not in self.bad and L.is_url(path):
                    wanted.setdefault(str(path), (str(path), shard.get("bytes"), shard.get("sha256")))
        if wanted:
            self.store.prefetch(list(wanted.values()))

    def frame(self, p: int) -> tuple[int, str, Any]:
        """(source, "source/key", decoded image) for global position ``p``, or its replacement."""
        flat, attempt = self._flat(p), 0
        while True:
            source = self.catalog.source_of(flat)
            got = self._try(flat, source)
            if got is not None:
                self.guard.ok(source)
                return source, got[0], got[1]
            self.guard.failed(source, self.problems.where)
            attempt += 1
            rng = np.random.default_rng([self.stream.seed, self.epoch, p, attempt, 0x5B])
            lo, hi = int(self.catalog.source_base[source]), int(self.catalog.source_base[source + 1])
            flat = lo + int(rng.integers(hi - lo))

    def _try(self, flat: int, source: int) -> tuple[str, Any] | None:
        j, k = self.catalog.locate(flat)
        if j in self.bad:
            return None
        _, spec, shard = self.shards[j]
        if not self.store.is_open(L.join(spec.directory, shard["file"])):
            self.stream._counters.add("shards_opened")
        entry = _open_shard(self.store, spec, shard, self.problems, f"{spec.name}:{j}")
        if entry is None:
            self._mark_bad(j, source, spec)
            return None
        if k >= len(entry.index):  # past the damage of a truncated shard (reported when it was opened)
            return None
        key = f"{spec.name}/{entry.index.keys[k]}"
        size = entry.index.largest_member(k)
        if self.stream.max_member_bytes and size > self.stream.max_member_bytes:
            self.problems("oversized_members", _oversized(spec.name, entry.index.keys[k], size, self.stream))
            return None
        try:
            sample = entry.read(k, ("jpg",))
        except (OSError, EOFError) as e:
            path = L.join(spec.directory, shard["file"])
            self.problems("truncated_shards", f"shard {path} of source {spec.name}: {e}", f"{spec.name}:{j}")
            return None
        if "jpg" not in sample:
            self.problems("corrupt_images", f"sample {key} has no .jpg member; skipped")
            return None
        try:
            image = self.decode(sample["jpg"])
        except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt data
            self.problems("corrupt_images", f"corrupt image {key} ({type(e).__name__}: {e}); skipped")
            return None
        self.last = (j, k)
        return key, image

    def neighbour(self, p: int) -> Any | None:
        """With probability ``temporal_positive_p``, a neighbouring frame of the frame :meth:`frame` returned for
        position ``p`` (decoded), else None. Neighbours: frames of the same video (the key's part before its last
        ``/``) in the same shard (prepare writes a video's frames in order), at most ``temporal_window_s`` seconds
        away (consecutive prepared frames are 1/fps s apart, fps: the source's prepare setting), that the epoch
        may use (the curated view's and the fraction's frames). Drawn from (seed, epoch, position): a resumed run
        makes the same choices. None too when there is no usable neighbour (a video of one frame)."""
        stream = self.stream
        rng = np.random.default_rng([stream.seed, self.epoch, p, 0x7E3])
        if rng.random() >= stream.temporal_positive_p:
            return None
        j, k = self.last
        _, spec, shard = self.shards[j]
        if spec.sample_fps is None:
            return None
        window = max(1, int(np.floor(stream.temporal_window_s * spec.sample_fps + 1e-9)))
        entry = _open_shard(self.store, spec, shard, self.problems, f"{spec.name}:{j}")
        if entry is None:
            return None
        keys, kept = entry.index.keys, self.catalog.kept[j]
        video = keys[k].rpartition("/")[0]
        candidates = [
            o
            for o in range(max(0, k - window), min(len(keys), k + window + 1))
            if o != k
            and keys[o].rpartition("/")[0] == video
            and (kept is None or _contains(kept, o))
            and not (stream.max_member_bytes and entry.index.largest_member(o) > stream.max_member_bytes)
        ]
        if not candidates:
            return None
        o = candidates[int(rng.integers(len(candidates)))]
        try:
            image = self.decode(entry.read(o, ("jpg",))["jpg"])
        except Exception as e:  # noqa: BLE001 - a bad neighbour: the anchor's own frame is used instead
            self.problems("corrupt_images", f"corrupt neighbour {spec.name}/{keys[o]} ({type(e).__name__}); skipped")
            return None
        stream._counters.add("temporal_positives")
        return image

    def _mark_bad(self, j: int, source: int, spec: SourceSpec) -> None:
        self.bad.add(j)
        lo, hi = np.flatnonzero(self.catalog.source_of_shard == source)[[0, -1]]
        if all(i in self.bad or self.catalog.frames[i] == 0 for i in range(int(lo), int(hi) + 1)):
            raise RuntimeError(
                f"Source {spec.name} ({spec.directory}): none of its {len(spec.shards)} shards can be read (see the "
                "warnings above). Check it with `python -m surgenet_ssl.datasets verify=true`, re-prepare it, or "
                "remove it from the mixture."
            )


def _contains(sorted_values: np.ndarray, value: int) -> bool:
    i = int(np.searchsorted(sorted_values, value))
    return i < len(sorted_values) and int(sorted_values[i]) == value


def resumed_samples(resume: Mapping[str, Any] | None) -> int:
    """The epoch's global position a resumed run continues from (``sampling=epoch``): given by the data module for a
    run on another number of ranks (``epoch_samples``), else the furthest position of the rank's workers."""
    if not resume:
        return 0
    if resume.get("epoch_samples") is not None:
        return int(resume["epoch_samples"])
    return max((int(v[1]) for v in (resume.get("workers") or {}).values()), default=0)


# ------------------------------------------------------------------------------------------- stream building blocks
def sample_stream(
    readers: list[_SourceReader], weights: list[float], rng: np.random.Generator, guard: _SkipGuard | None = None
) -> Iterator[tuple[int, str, bytes]]:
    """Endless ``(source index, "source/key", jpeg bytes)``: a source drawn by weight, then its next sample. A
    sample without a JPEG is counted (and, with ``guard``, counts towards its source's consecutive skips)."""
    cum = np.cumsum(weights)
    cum /= cum[-1]
    while True:
        i = min(int(np.searchsorted(cum, rng.random(), side="right")), len(readers) - 1)
        key, sample = readers[i].next()
        if "jpg" not in sample:
            readers[i].problem("corrupt_images", f"sample {key} has no .jpg member; skipped")
            if guard is not None:
                guard.failed(i, f"source {readers[i].spec.name}")
            continue
        yield i, f"{readers[i].spec.name}/{key}", sample["jpg"]


def _item_bytes(item: Any) -> int:
    """Bytes an item holds in the shuffle buffer: the encoded frame of ``(source, key, bytes)``."""
    return len(item[2]) if isinstance(item, tuple) and len(item) == 3 and isinstance(item[2], bytes) else 0


def shuffle_buffer(
    stream: Iterator[Any], size: int, rng: np.random.Generator, max_bytes: int | None = None
) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``size`` items (raw bytes: decoding happens after it) holding at most
    ``max_bytes`` of encoded frames (a few huge frames do not make it grow to GBs). Each item comes out once; output
    ``k`` is one of the first ``k + size`` inputs. The training stream is endless; a finite one is drained at its
    end, so it comes out as a permutation of itself. ``size <= 1``: passed through unchanged."""
    if size <= 1:
        yield from stream
        return
    buf: list[Any] = []
    held = 0
    limit = max_bytes if max_bytes and max_bytes > 0 else None
    for item in stream:
        if len(buf) < size and (limit is None or held + _item_bytes(item) <= limit or not buf):
            buf.append(item)
            held += _item_bytes(item)
            continue
        j = int(rng.integers(len(buf)))
        buf[j], item = item, buf[j]
        held += _item_bytes(buf[j]) - _item_bytes(item)
        yield item
        while limit is not None and held > limit and len(buf) > 1:  # over the byte bound: give out, at random
            out = buf.pop(int(rng.integers(len(buf))))
            held -= _item_bytes(out)
            yield out
    while buf:  # a finite stream ended: what is left, in random order
        yield buf.pop(int(rng.integers(len(buf))))


class WorkerPlan(NamedTuple):
    """What one loader worker produces in an epoch: ``batches`` in all, starting at ``first_batch`` after replaying
    ``skip_samples`` stream items (a resumed epoch), as logical worker ``worker``."""

    worker: int
    batches: int
    first_batch: int = 0
    skip_samples: int = 0


def batches_for_worker(steps: int, num_workers: int, worker: int) -> int:
    """Worker ``worker``'s share of an epoch's batches; the DataLoader takes them round-robin."""
    base, extra = divmod(steps, num_workers)
    return base + (1 if worker < extra else 0)


def worker_plan(steps: int, num_workers: int, physical: int, resume: Mapping[str, Any] | None) -> WorkerPlan:
    """The plan of physical worker ``physical``. Resuming after ``resume["batches"]`` batches, the DataLoader asks
    physical worker 0 first, while the uninterrupted run would ask logical worker ``batches % num_workers`` next:
    rotating the worker ids by that much makes the resumed order the uninterrupted one."""
    if not resume:
        return WorkerPlan(physical, batches_for_worker(steps, num_workers, physical))
    done = int(resume.get("batches", 0))
    worker = (physical + done) % num_workers
    total = batches_for_worker(steps, num_workers, worker)
    state = (resume.get("workers") or {}).get(worker) or (resume.get("workers") or {}).get(str(worker))
    if state is not None and int(resume.get("num_workers", -1)) == num_workers:
        return WorkerPlan(worker, total, first_batch=int(state[0]), skip_samples=int(state[1]))
    # The worker layout changed (another num_workers): continue the epoch's length, not its exact order.
    consumed = done // num_workers + (1 if worker < done % num_workers else 0)
    return WorkerPlan(worker, total, first_batch=min(total, consumed), skip_samples=0)


@contextlib.contextmanager
def _seeded_randomness(seed: int, restore: bool) -> Iterator[None]:
    """torch / numpy / random seeded with ``seed`` inside the block; with ``restore`` their state is put back."""
    saved = (torch.get_rng_state(), np.random.get_state(), random.getstate()) if restore else None
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])


class _EpochLoader(DataLoader):
    """DataLoader that advances the stream's epoch on each new iteration unless ``set_epoch`` was called."""

    def __iter__(self):
        ds = self.dataset
        if not isinstance(ds, MixtureStream):
            return super().__iter__()
        if not ds._epoch_explicit and ds._iterations > 0:
            ds.epoch += 1
        ds._epoch_explicit = False
        ds._iterations += 1
        if ds.resume_position is not None and int(ds.resume_position["epoch"]) != ds.epoch:
            ds.resume_position = None
        with single_threaded_opencv_fork():
            iterator = super().__iter__()  # workers (or the in-process iterator) took the resume position
        ds.resume_position = None  # later epochs start from their beginning
        return iterator

    # Lightning treats a loader with state_dict/load_state_dict as resumable mid-epoch. The position itself is kept
    # by the data module (StreamPosition: what the training loop consumed, not what the workers prefetched).
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


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
    shard_cache_dir: str | Path | None = None,
    persistent_workers: bool = False,
    resume_position: Mapping[str, Any] | None = None,
    mixture: ResolvedMixture | None = None,
    **options: Any,
) -> DataLoader:
    """The training DataLoader of a ``dataset`` config (see surgenet_ssl.data.mixture for the schema).

    Reads the sources' manifests only; raises :class:`~surgenet_ssl.data.mixture.MissingSourcesError` listing
    every missing source unless ``dataset.allow_missing`` is true. ``len(loader)`` = steps per epoch (identical on
    every rank). ``loader.dataset`` is the :class:`MixtureStream` (``sources``, ``frames_per_source``,
    ``steps_per_epoch``, ``stats``, ``set_epoch``). ``epoch`` seeds the first iteration (pass the resumed epoch:
    Lightning creates the first iterator before ``on_train_epoch_start``). ``shard_cache_dir``: keep remote shards
    there once read completely (null: stream them, no local copy); local shards are always read in place.
    ``pin_memory`` (for CUDA training: page-locked batches, asynchronous copies), ``persistent_workers`` (workers
    kept between epochs; the epoch still reseeds them) and ``prefetch_factor`` are passed to the DataLoader.
    ``options``: the other keyword arguments of :class:`MixtureStream` (``sampling``, ``shuffle_block``, the
    memory, cache and transfer bounds; see surgenet_ssl/configs/data/default.yaml). ``mixture``: the dataset
    already resolved from its manifests (the datamodule reads them once, also for GPU mode's canvas).
    """
    mixture = mixture if mixture is not None else resolve_mixture(dataset_cfg, data_root)
    stream = MixtureStream(
        mixture,
        transform,
        batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        steps_per_epoch=steps_per_epoch,
        shuffle_buffer=shuffle_buffer,
        shards_in_flight=shards_in_flight,
        shard_cache_dir=shard_cache_dir,
        **options,
    )
    if epoch is not None:
        stream.set_epoch(epoch)
    if rank == 0:
        log.info("%s", stream.describe())
        remote = [f"{s.name} ({s.directory})" for s in mixture.sources if L.is_url(s.directory)]
        if remote:
            cache = (
                f"cached in {stream.shard_cache_dir}"
                if stream.shard_cache_dir
                else "fetched into temporary files, no cache"
            )
            log.info("remote sources, shards %s: %s", cache, ", ".join(remote))
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    kwargs: dict[str, Any] = {}
    if num_workers > 0 and prefetch_factor is not None:
        kwargs["prefetch_factor"] = prefetch_factor
    if resume_position:
        stream.resume_at(resume_position)
    return _EpochLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=ignore_preemption_signals_in_worker if num_workers > 0 else None,
        generator=torch.Generator(),  # iterators draw their base seed here, not from the training process' RNG
        persistent_workers=bool(persistent_workers) and num_workers > 0,
        **kwargs,
    )


def read_sample_metadata(sample: Mapping[str, bytes]) -> dict[str, Any]:
    """The per-frame metadata (source, procedure, video, frame_index, timestamp, ...) of a raw shard sample."""
    return json.loads(sample["json"]) if "json" in sample else {}

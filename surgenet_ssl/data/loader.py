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

from surgenet_ssl.cluster import ignore_preemption_signals_in_worker
from surgenet_ssl.data import location as L
from surgenet_ssl.data.decode import decode_rgb_image
from surgenet_ssl.data.mixture import ResolvedMixture, SourceSpec, resolve_mixture
from surgenet_ssl.data.shards import iter_shard, keep_frame
from surgenet_ssl.resources import limit_worker_threads, single_threaded_opencv_fork

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
        return {n: int(v) for n, v in zip(STAT_NAMES, sums, strict=True)}


class _SourceReader:
    """Endless stream of raw samples of one source: ``in_flight`` random shards read interleaved."""

    def __init__(
        self,
        spec: SourceSpec,
        fraction: float,
        rng: np.random.Generator,
        counters: _Counters,
        where: str,
        in_flight: int = 4,
        cache_dir: str | None = None,
    ) -> None:
        self.spec, self.fraction, self.rng, self.counters, self.where = spec, fraction, rng, counters, where
        self.cache_dir = cache_dir
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
        it = iter_shard(
            L.join(self.spec.directory, shard["file"]),
            keep=keep,
            counts=counts,
            cache_dir=self.cache_dir,
            size=shard.get("bytes"),
            sha256=shard.get("sha256"),
        )
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
            path = L.join(self.spec.directory, shard["file"])
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
                        "its .state record first)",
                        counts["index"],
                    )
            except FileNotFoundError as e:
                self.open.pop(j)
                why = f" ({getattr(e, 'reason', e)})" if L.is_url(path) else ""  # e.g. an HTTP 404
                self.problem(
                    "unreadable_shards",
                    f"shard {path} of source {self.spec.name} is missing{why}; skipped",
                    counts["index"],
                )
                self._drop(counts["index"])
            except (tarfile.TarError, OSError, EOFError) as e:
                self.open.pop(j)
                readable = counts["keys"] > 1  # the key being read when it broke does not count
                why = getattr(e, "reason", None) or f"{type(e).__name__}: {e}"  # a remote read names its tool's error
                self.problem(
                    "truncated_shards" if readable else "unreadable_shards",
                    f"shard {path} of source {self.spec.name} is damaged after {max(0, counts['keys'] - 1)} frames "
                    f"({why}); " + ("using the frames before the damage" if readable else "skipped"),
                    counts["index"],
                )
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

    (``{"frames": uint8 Tensor(B,3,H,W), "frame_hw": Tensor(B,2), ...}`` instead when the transform's
    ``batch_key`` is "frames": GPU augmentation mode, each frame's valid size in its padded canvas.)

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
        shard_cache_dir: str | Path | None = None,
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
        self.shard_cache_dir = str(Path(shard_cache_dir).expanduser()) if shard_cache_dir else None
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
        # In shared memory, so persistent workers (which keep their copy of this object) see set_epoch too.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._epoch_explicit = False
        self._iterations = 0
        # Where a resumed run continues: {"epoch", "batches", "num_workers", "workers": {w: [batches, samples]}}.
        self.resume_position: dict[str, Any] | None = None
        self._counters = _Counters()

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

    def describe(self) -> str:
        parts = [f"{n}: {self.frames_per_source[n]} frames, p={self.weights[n]:.3f}" for n in self.sources]
        return (
            f"dataset {self.mixture.name} (fraction {self.mixture.fraction:g}): {len(self.sources)} sources, "
            f"{sum(self.frames_per_source.values())} frames, {self.steps_per_epoch} steps/epoch of "
            f"{self.batch_size} x {self.world_size} ranks [" + "; ".join(parts) + "]"
        )

    # ---------------------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        resume = self.resume_position if (self.resume_position or {}).get("epoch") == epoch else None
        plan = worker_plan(self.steps_per_epoch, num_workers, physical, resume)
        if info is not None:
            limit_worker_threads()  # each worker is one of the process' cores: no torch/OpenCV thread pools
        return self._batches(epoch, plan, main_process=info is None)

    def _batches(self, epoch: int, plan: WorkerPlan, main_process: bool) -> Iterator[dict[str, Any]]:
        worker = plan.worker
        self._counters.slot = worker % _STAT_SLOTS
        seq = np.random.SeedSequence([self.seed, epoch, self.rank, worker, 0x5D6E])
        rng = np.random.default_rng(seq)
        where = f"rank {self.rank} worker {worker}"
        readers = [
            _SourceReader(
                s,
                self.mixture.fraction,
                np.random.default_rng(seq.spawn(1)[0]),
                self._counters,
                where,
                self.shards_in_flight,
                self.shard_cache_dir,
            )
            for s in self.mixture.sources
        ]
        stream = shuffle_buffer(
            sample_stream(readers, [s.weight for s in self.mixture.sources], rng), self.shuffle_buffer, rng
        )
        raw = 0
        for _ in range(plan.skip_samples):  # resume: replay the stream up to where the interrupted run stood
            next(stream)
            raw += 1
        for index in range(plan.first_batch, plan.batches):
            # Augmentation randomness is seeded per batch from (seed, epoch, rank, worker, batch): a resumed run makes
            # the same crops without replaying the ones before. In the training process (num_workers=0) the global
            # random state is put back afterwards: it is not the loader's.
            batch_seed = int(
                np.random.SeedSequence([self.seed, epoch, self.rank, worker, index, 0xA06]).generate_state(1)[0]
            )
            with _seeded_randomness(batch_seed, restore=main_process):
                batch, used = self._make_batch(stream, readers)
            raw += used
            batch["position"] = torch.tensor([epoch, worker, index + 1, raw], dtype=torch.long)
            yield batch

    def _make_batch(
        self, stream: Iterator[tuple[int, str, bytes]], readers: list[_SourceReader]
    ) -> tuple[dict[str, Any], int]:
        """One batch from the stream; returns it and the number of stream items it used (corrupt ones included)."""
        # Transforms may decode themselves (e.g. reduced-size JPEG decoding) and report conversions/upscales.
        decode = getattr(self.transform, "decode", decode_rgb_image)
        consume_events = getattr(self.transform, "consume_events", None)
        batch_key = getattr(self.transform, "batch_key", "crops")  # "frames": uint8 frames for GPU augmentation
        crops_per_sample: list[list[torch.Tensor]] = []
        labels: list[int] = []
        keys: list[str] = []
        used = 0
        while len(keys) < self.batch_size:
            i, key, jpg = next(stream)
            used += 1
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
        keys_out = getattr(self.transform, "batch_keys", (batch_key,))  # GPU mode: ("frames", "frame_hw")
        batch: dict[str, Any] = {"crops": crops} if batch_key == "crops" else dict(zip(keys_out, crops, strict=False))
        return {**batch, "source": torch.tensor(labels, dtype=torch.long), "key": keys}, used


# ------------------------------------------------------------------------------------------- stream building blocks
def sample_stream(
    readers: list[_SourceReader], weights: list[float], rng: np.random.Generator
) -> Iterator[tuple[int, str, bytes]]:
    """Endless ``(source index, "source/key", jpeg bytes)``: a source drawn by weight, then its next sample."""
    cum = np.cumsum(weights)
    cum /= cum[-1]
    while True:
        i = min(int(np.searchsorted(cum, rng.random(), side="right")), len(readers) - 1)
        key, sample = readers[i].next()
        if "jpg" not in sample:
            readers[i].problem("corrupt_images", f"sample {key} has no .jpg member; skipped")
            continue
        yield i, f"{readers[i].spec.name}/{key}", sample["jpg"]


def shuffle_buffer(stream: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``size`` items (raw bytes: decoding happens after it). Each item comes
    out once; output ``k`` is one of the first ``k + size`` inputs. The training stream is endless; a finite one
    is drained at its end, so it comes out as a permutation of itself. ``size <= 1``: passed through unchanged."""
    if size <= 1:
        yield from stream
        return
    buf: list[Any] = []
    for item in stream:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(len(buf)))
        buf[j], item = item, buf[j]
        yield item
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
    """
    mixture = resolve_mixture(dataset_cfg, data_root)
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
    )
    if epoch is not None:
        stream.set_epoch(epoch)
    if rank == 0:
        log.info("%s", stream.describe())
        remote = [f"{s.name} ({s.directory})" for s in mixture.sources if L.is_url(s.directory)]
        if remote:
            cache = f"cached in {stream.shard_cache_dir}" if stream.shard_cache_dir else "streamed, no local copy"
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

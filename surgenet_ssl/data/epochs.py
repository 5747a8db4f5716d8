"""Exact epochs: a seeded global order of the mixture's frames, the same on every rank and worker, cut into batches.

An epoch is one pass over the mixture (after ``fraction``): every frame once, each source's frames repeated by its
factor (weight share / frame share: 2.0 = each frame twice, 0.5 = a seeded half, another half each epoch).

Order (:func:`epoch_order`): shards in a random order, their frames cut into blocks of ``block`` frames, each block
shuffled (MosaicML Streaming's "py1b" shuffle, written here for our shards). A block of at least the dataset's size
is a uniform random permutation; a smaller one bounds how many shards are read at the same time (open files, cached
remote bytes) at the cost of mixing frames of at most ``block`` consecutive frames of shards.

Partition: global position ``p`` of the epoch belongs to global batch ``p // G`` (``G`` = batch x ranks), rank
``(p % G) // batch``; a rank's batch ``t`` is made by its loader worker ``t % workers`` (the DataLoader's round
robin). So the order does not depend on the number of ranks or workers, and an epoch interrupted after ``P`` samples
continues from position ``P`` on any number of ranks and workers (elastic resume).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Catalog", "epoch_order", "epoch_steps", "rank_batch_positions"]


@dataclass
class Catalog:
    """The frames an epoch draws from, shard by shard (shards of source 0 first, then source 1, ...).

    ``frames[j]``: frames of global shard ``j`` the epoch uses; ``kept[j]``: their ordinals in the shard (None: all
    of ``0 .. frames[j]-1``, i.e. fraction 1). ``repeats[s]``: the repeat factor of source ``s``."""

    source_of_shard: np.ndarray  # int64 (shards,)
    frames: np.ndarray  # int64 (shards,)
    kept: list[np.ndarray | None]
    repeats: list[float]

    def __post_init__(self) -> None:
        self.shard_base = np.concatenate([[0], np.cumsum(self.frames)]).astype(np.int64)
        n_sources = len(self.repeats)
        per_source = np.bincount(self.source_of_shard, weights=self.frames, minlength=n_sources).astype(np.int64)
        self.source_base = np.concatenate([[0], np.cumsum(per_source)]).astype(np.int64)

    @property
    def total(self) -> int:
        return int(self.shard_base[-1])

    def source_frames(self, s: int) -> int:
        return int(self.source_base[s + 1] - self.source_base[s])

    def epoch_size(self) -> int:
        """Frames in one epoch after the repeat factors."""
        return sum(_repeat_count(self.source_frames(s), r) for s, r in enumerate(self.repeats))

    def locate(self, flat: int) -> tuple[int, int]:
        """Frame id -> (global shard, ordinal of the sample in its tar)."""
        shard = int(np.searchsorted(self.shard_base, flat, side="right")) - 1
        j = flat - int(self.shard_base[shard])
        kept = self.kept[shard]
        return shard, int(kept[j]) if kept is not None else j

    def source_of(self, flat: int) -> int:
        return int(np.searchsorted(self.source_base, flat, side="right")) - 1


def _repeat_count(n: int, factor: float) -> int:
    whole = int(np.floor(factor))
    return whole * n + int(round((factor - whole) * n))


def _epoch_items(catalog: Catalog, rng: np.random.Generator) -> np.ndarray:
    """The epoch's frame ids with the sources' repeat factors applied (sorted, so grouped by shard)."""
    parts = []
    for s, factor in enumerate(catalog.repeats):
        lo, hi = int(catalog.source_base[s]), int(catalog.source_base[s + 1])
        n = hi - lo
        if n == 0 or factor <= 0:
            continue
        whole = int(np.floor(factor))
        ids = np.arange(lo, hi, dtype=np.int64)
        parts += [ids] * whole
        extra = int(round((factor - whole) * n))
        if extra:
            parts.append(lo + rng.choice(n, size=extra, replace=False).astype(np.int64))
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(parts), kind="stable")


def epoch_order(catalog: Catalog, seed: int, epoch: int, block: int) -> np.ndarray:
    """The epoch's global order of frame ids: identical for a given (seed, epoch, block) on every rank and worker."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0xE90C]))
    items = _epoch_items(catalog, rng)
    n_shards = len(catalog.frames)
    if len(items) == 0:
        return items
    block = max(1, int(block))
    if block >= len(items):
        return rng.permutation(items)
    shard_rank = rng.permutation(n_shards)
    shard = np.searchsorted(catalog.shard_base, items, side="right") - 1
    items = items[np.argsort(shard_rank[shard], kind="stable")]  # shards in a random order, frames in file order
    for start in range(0, len(items), block):
        rng.shuffle(items[start : start + block])
    return items


def epoch_steps(epoch_size: int, batch_size: int, world_size: int, steps: int | None) -> int:
    """Batches per rank in an epoch: ``steps`` if given, else the complete global batches of the epoch (the last,
    incomplete one is dropped, as DistributedSampler(drop_last=True) does), at least 1."""
    if steps is not None:
        return int(steps)
    return max(1, epoch_size // (batch_size * world_size))


def rank_batch_positions(offset: int, t: int, rank: int, world_size: int, batch_size: int) -> range:
    """Global positions of rank ``rank``'s batch ``t`` of an epoch continued from position ``offset``."""
    start = offset + t * batch_size * world_size + rank * batch_size
    return range(start, start + batch_size)

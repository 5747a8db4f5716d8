"""Deterministic low-data subsets: ``data.train_fraction`` keeps the same samples on every machine and every run.

Like ``dataset.fraction`` of pretraining, membership is decided by a hash of a stable name, never by the listing
order or a random generator:

- **by group** (videos / cases, where the layout has them): the groups are ranked by ``blake2b(name)`` and the first
  ``ceil(fraction x groups)`` are kept with all of their frames, so a 10 % run trains on fewer *cases*, as in the
  papers' low-data experiments, and never sees frames of a case it does not own;
- **by sample** (no groups): within each stratum (the class of a single-label sample; one stratum otherwise) the
  samples are ranked by the hash of their relative path and the first ``ceil(fraction x n)`` are kept, so every
  class keeps its share (at least one sample).

Ranking by hash makes the subsets nested: the 10 % set is contained in the 25 % set, which is in the 50 % set.
The subset does not depend on the training seed (several seeds = several trainings on the same subset).

Where a set publishes its label fractions (Endoscapes2023: 12.5 % and 25 % of the training videos, 3 folds each),
those fractions take the published videos instead, so results compare with the papers'.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["stable_rank_key", "select_fraction", "official_fraction"]


def stable_rank_key(name: str) -> int:
    """64-bit blake2b of ``name``: the sort key that decides membership (the same everywhere)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "big")


def _keep_count(fraction: float, n: int) -> int:
    return min(n, max(1, math.ceil(fraction * n - 1e-9)))


def select_fraction(
    keys: Sequence[str],
    fraction: float,
    groups: Sequence[str | None] | None = None,
    strata: Sequence[object] | None = None,
    by: str = "auto",
) -> tuple[list[int], str]:
    """Indices of the kept samples (in their original order) and how they were chosen (``"group"``/``"sample"``).

    Args:
        keys: one stable name per sample (e.g. its path relative to the dataset root).
        fraction: in (0, 1]; 1 keeps everything.
        groups: the video / case of each sample (None entries: unknown).
        strata: the class of each sample for per-class stratification when sampling by sample (single-label only).
        by: ``auto`` (groups when every sample has one and there are at least 2), ``group`` or ``sample``.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"data.train_fraction must be in (0, 1], got {fraction}")
    n = len(keys)
    if by not in ("auto", "group", "sample"):
        raise ValueError(f"data.fraction_by must be auto, group or sample; got {by!r}")
    # the groups, where every sample has one
    named = groups if groups is not None and len(groups) == n and all(g is not None for g in groups) else None
    if by == "group" and named is None:
        raise ValueError(
            "data.fraction_by=group, but the layout gives no video/case for every sample "
            "(use a layout with video folders / a video column, or data.fraction_by=sample)"
        )
    use_groups = named is not None and (by == "group" or (by == "auto" and len(set(named)) >= 2))
    if fraction >= 1:
        return list(range(n)), "group" if use_groups else "sample"
    if named is not None and use_groups:
        names = sorted(set(named), key=lambda g: (stable_rank_key(str(g)), str(g)))
        kept = set(names[: _keep_count(fraction, len(names))])
        return [i for i, g in enumerate(named) if g in kept], "group"
    by_stratum: dict[object, list[int]] = {}
    for i in range(n):
        by_stratum.setdefault(strata[i] if strata is not None else None, []).append(i)
    chosen: list[int] = []
    for members in by_stratum.values():
        ranked = sorted(members, key=lambda i: (stable_rank_key(keys[i]), keys[i]))
        chosen.extend(ranked[: _keep_count(fraction, len(ranked))])
    return sorted(chosen), "sample"


def official_fraction(data_cfg: Any, samples: Sequence[Any]) -> tuple[list[int], dict[str, Any]] | None:
    """``(kept indices, summary)`` where ``data.train_fraction`` is a label fraction the set publishes (Endoscapes:
    12.5 % / 25 %, fold ``data.fraction_fold``), so results compare with the papers; None otherwise (hash ranking).
    ``data.official_fractions=false`` always ranks by hash."""
    fraction = float(data_cfg.train_fraction)
    if str(data_cfg.get("format")) != "endoscapes_cvs" or fraction >= 1 or not data_cfg.get("official_fractions", True):
        return None
    from .endoscapes import official_fraction_videos

    fold = int(data_cfg.get("fraction_fold") or 0)
    found = official_fraction_videos(str(data_cfg.train), fraction, fold)
    if found is None:
        return None
    videos, folder = found
    present = {s.group for s in samples}
    absent = sorted(videos - present, key=lambda v: (len(v), v))
    if absent:
        raise ValueError(
            f"{folder} (the official {fraction:.1%} split) has videos {absent[:8]} that are not in data.train="
            f"{data_cfg.train}: pass the release's train folder as data.train."
        )
    keep = [i for i, s in enumerate(samples) if s.group in videos]
    return keep, {
        "train_fraction": fraction,
        "fraction_by": "official",
        "official_split": str(folder),
        "train_samples_total": len(samples),
        "train_samples_used": len(keep),
        "train_videos_used": sorted(videos, key=lambda v: (len(v), v)),
    }

"""Collective helpers for state that differs per rank (data position, RNG) but is written by rank 0 only."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def gather_from_ranks(obj: Any, world_size: int = 1) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (one ``all_gather_object``; ``[obj]`` when not distributed).

    Call it on all ranks together, e.g. while Lightning dumps a checkpoint (which every rank does).
    """
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]

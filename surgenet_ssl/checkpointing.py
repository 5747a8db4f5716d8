"""Checkpoints on disk: atomic writes where they land, and the choice of the checkpoint a rerun resumes from.

Why: Lightning's own atomic save writes a temp file under ``$TMPDIR`` and moves it. With a node-local /tmp and
the run dir on Lustre/NFS that move is a copy, and a job killed mid-copy leaves a truncated newest checkpoint that
crash-loops every requeue. Here the temp file is written in the destination directory, fsynced and renamed (a
rename within one directory is atomic on POSIX file systems), and a rerun that finds a newest checkpoint which does
not load reports it and resumes from the previous good one.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from surgenet_ssl.io_utils import atomic_path
from surgenet_ssl.models.weights import refuses_pickled_objects
from surgenet_ssl.storage_errors import as_storage_error

log = logging.getLogger(__name__)

# Files of a run dir that hold a resumable training state.
PREEMPTION_PREFIX = "preempted-step"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. a file system without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` through a temp file in the same directory (fsync, rename): readers see the old
    file or the whole new one, never a part; a failure leaves the old file untouched and no temp file behind."""
    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except (OSError, RuntimeError) as err:  # torch.save says "unexpected pos ..." when the disk fills
        storage = as_storage_error(err, path)
        if storage is None:
            raise
        raise storage from err
    _fsync_dir(Path(path).parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO plugin: :func:`atomic_torch_save` for local paths, Lightning's own IO for URLs."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


def link_atomically(target: Path, link: Path) -> None:
    """Point ``link`` (e.g. ``last.ckpt``) at ``target`` with one rename: never a moment without a ``last.ckpt``."""
    tmp = link.parent / f".{link.name}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(os.path.relpath(target, link.parent), tmp)
    except OSError:  # file systems without symlinks: a copy
        import shutil

        shutil.copyfile(target, tmp)
    os.replace(tmp, link)
    _fsync_dir(link.parent)


def load_checkpoint(path: str | Path) -> Any:
    """A checkpoint file read as data: ``torch.load(weights_only=True)``, memory-mapped. Our checkpoints hold tensors
    and plain containers only; a file that needs any other object (a pickled payload) is refused, never run."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (truncated, corrupt, holds objects other than tensors and plain data, not
    a training checkpoint), or None if it loads."""
    try:
        ckpt = load_checkpoint(path)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else ""
        if refuses_pickled_objects(err):
            return (
                "it holds pickled Python objects besides tensors and plain data, which are refused (never run); "
                "surgenet-ssl never writes such a file"
            )
        return f"file is truncated or corrupt ({type(err).__name__}: {first})"
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        return "not a Lightning training checkpoint (no state_dict/global_step)"
    return None


def resume_candidates(run_dir: Path) -> list[Path]:
    """Checkpoints of a run dir, newest first (``last.ckpt`` is a link to one of them, so it is not listed twice)."""
    ckpt_dir = run_dir / "checkpoints"
    found = list(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    found += list(run_dir.glob("hpc_ckpt_*.ckpt"))  # Lightning's own SLURM checkpoints (older runs)
    unique: dict[Path, Path] = {}
    for p in sorted(found, key=lambda p: p.name == "last.ckpt"):  # a real file's own name before last.ckpt
        try:
            unique.setdefault(p.resolve(strict=True), p)
        except (OSError, RuntimeError):  # dangling link
            continue
    return sorted(unique.values(), key=lambda p: p.stat().st_mtime_ns, reverse=True)


def find_resume_checkpoint(run_dir: Path, set_aside: bool = False) -> Path | None:
    """The newest checkpoint of the run dir that loads. Newer ones that do not load are reported; with
    ``set_aside`` (global rank 0 only) they are renamed ``*.ckpt.corrupt``, kept for inspection and skipped by
    later requeues."""
    for path in resume_candidates(run_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning(
            "checkpoint %s cannot be resumed from: %s. Resuming from the previous checkpoint instead.", path, problem
        )
        if set_aside and not path.is_symlink():
            try:
                os.replace(path, path.with_name(path.name + ".corrupt"))
            except OSError:  # another process moved it already
                pass
    return None


RESUME_ENV = "SURGENET_SSL_RESUME_CHECKPOINT"  # rank 0's choice, inherited by the DDP processes it starts


def choose_resume_checkpoint(run_dir: Path, rank_zero: bool) -> Path | None:
    """The checkpoint this training resumes from, chosen by global rank 0 (which also sets aside damaged ones).

    Lightning's DDP launcher starts the other ranks from rank 0 with a copy of its environment, so they take rank
    0's choice from :data:`RESUME_ENV` instead of listing the run dir themselves (while rank 0 may be renaming a
    damaged file). Ranks started by SLURM or torchrun choose alike from the shared run dir, and
    :func:`check_same_checkpoint` turns any difference into an error before anything is restored."""
    inherited = os.environ.get(RESUME_ENV)
    if inherited is not None and not rank_zero:
        return Path(inherited) if inherited else None
    ckpt = find_resume_checkpoint(run_dir, set_aside=rank_zero)
    if rank_zero:
        os.environ[RESUME_ENV] = str(ckpt.resolve()) if ckpt is not None else ""
    return ckpt


def check_same_checkpoint(ckpt_path: str | Path | None, world_size: int) -> None:
    """Every rank resumes from the same file, or every rank stops with the list (one ``all_gather_object``; call it
    on all ranks, after the process group exists and before the checkpoint is restored)."""
    from surgenet_ssl.distributed import gather_from_ranks

    mine = str(Path(ckpt_path).resolve()) if ckpt_path else None
    chosen = gather_from_ranks(mine, world_size)
    if len(set(chosen)) > 1:
        listing = "; ".join(f"rank {r}: {c or 'none (fresh start)'}" for r, c in enumerate(chosen))
        raise RuntimeError(
            f"the ranks chose different checkpoints to resume from ({listing}). They would train from different "
            "weights and data positions. Is the run dir on a file system every node sees (not node-local /tmp)? "
            "Did a checkpoint change while the job started? Rerun the job; it will resume from the newest checkpoint "
            "that loads on all ranks."
        )


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint was written at (memory-mapped: only the small header is read)."""
    return int(load_checkpoint(path).get("global_step", 0))

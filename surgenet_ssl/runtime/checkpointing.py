"""Checkpoints on disk: atomic writes where they land, and the choice of the checkpoint a rerun resumes from.

Why: Lightning's own atomic save writes a temp file under ``$TMPDIR`` and moves it. With a node-local /tmp and
the run dir on Lustre/NFS that move is a copy, and a job killed mid-copy leaves a truncated newest checkpoint that
crash-loops every requeue. Here the temp file is written in the destination directory, fsynced and renamed (a
rename within one directory is atomic on POSIX file systems), and a rerun that finds a newest checkpoint which does
not load, or whose bytes no longer match the sha256 recorded when it was written, reports it and resumes from the
previous good one.

Exact resume: :func:`normalize_loop_progress` makes every kind of checkpoint (step, epoch-end, preemption) restore
the loop counters of the moment it was written; see its docstring for the Lightning behaviour it corrects.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import IO, Any, cast

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from surgenet_ssl.models.weights import refuses_pickled_objects
from surgenet_ssl.runtime.io_utils import atomic_path, sha256_file, write_text_atomic
from surgenet_ssl.runtime.storage_errors import as_storage_error

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


def checksum_path(path: str | Path) -> Path:
    """The sidecar holding a checkpoint's sha256 (``sha256sum`` format): ``<name>.sha256`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through: the checksum costs no second read of a multi-GB
    checkpoint."""

    def __init__(self, file: Any) -> None:
        self.file, self.sha256 = file, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` through a temp file in the same directory (fsync, rename): readers see the old
    file or the whole new one, never a part; a failure leaves the old file untouched and no temp file behind, and a
    full disk is a :class:`~surgenet_ssl.runtime.storage_errors.StorageError` naming the path and the fix.

    The sha256 of the bytes is computed while they are written and stored in :func:`checksum_path`, written after
    the checkpoint (an old sidecar is removed first, so a kill between the two renames leaves a checkpoint without a
    checksum, checked by loading only, never one with a wrong checksum)."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                writer = _HashingWriter(f)
                torch.save(obj, cast("IO[bytes]", writer))  # torch.save calls write and flush only
            checksum_path(path).unlink(missing_ok=True)
        write_text_atomic(checksum_path(path), f"{writer.sha256.hexdigest()}  {path.name}\n")
    except (OSError, RuntimeError) as err:  # torch.save says "unexpected pos ..." when the disk fills
        storage = as_storage_error(err, path)
        if storage is None:
            raise
        raise storage from err
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO plugin: :func:`atomic_torch_save` for local paths, Lightning's own IO for URLs."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def remove_checkpoint(self, path: Any) -> None:
        if "://" in str(path):
            return super().remove_checkpoint(path)
        remove_checkpoint_file(Path(path))


def remove_checkpoint_file(path: Path) -> None:
    """Delete a checkpoint and its checksum sidecar."""
    path.unlink(missing_ok=True)
    checksum_path(path).unlink(missing_ok=True)


def remove_partial_saves(run_dir: Path) -> list[Path]:
    """Delete the temp files of checkpoint saves and ``last.ckpt`` links cut short by a kill (a partial checkpoint
    can be GBs). Call only while holding the run-dir lock: then no live process of this run writes them."""
    ckpt_dir = run_dir / "checkpoints"
    removed = []
    for path in sorted(ckpt_dir.rglob(".*")) if ckpt_dir.is_dir() else []:
        if path.is_file() and (path.name.endswith(".tmp") or ".tmp-" in path.name):
            size = path.stat().st_size
            path.unlink(missing_ok=True)
            removed.append(path)
            log.info("removed %s (%.1f MB), the partial save of a killed run", path, size / 1e6)
    return removed


def link_atomically(target: Path, link: Path) -> None:
    """Point ``link`` (e.g. ``last.ckpt``) at ``target`` with one rename: never a moment without a ``last.ckpt``."""
    tmp = link.parent / f".{link.name}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(os.path.relpath(target, link.parent), tmp)
    except OSError:  # file systems without symlinks: a copy
        import shutil

        shutil.copyfile(target, tmp)
        if checksum_path(target).is_file():  # the copy is checked like its original
            write_text_atomic(checksum_path(link), checksum_path(target).read_text().split()[0] + f"  {link.name}\n")
    os.replace(tmp, link)
    _fsync_dir(link.parent)


def load_checkpoint(path: str | Path) -> Any:
    """A checkpoint file read as data: ``torch.load(weights_only=True)``, memory-mapped. Our checkpoints hold tensors
    and plain containers only; a file that needs any other object (a pickled payload) is refused, never run."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def checksum_problem(path: Path) -> str | None:
    """Why the bytes of ``path`` are not the ones written (its sha256 differs from the recorded one), or None. One
    sequential read of the file, done once per start for the checkpoint chosen (it also warms the page cache for
    the load that follows); a checkpoint without a sidecar (older versions, a kill between the two renames) is
    only checked by loading."""
    real = path.resolve()  # last.ckpt: the file it points at
    sidecar = checksum_path(real)
    try:
        recorded = sidecar.read_text().split()[0]
    except (OSError, IndexError):
        return None
    actual = sha256_file(real)
    if actual != recorded:
        return (
            f"its sha256 {actual[:16]}... differs from the one recorded when it was written ({sidecar.name}: "
            f"{recorded[:16]}...): the file changed on disk after it was saved"
        )
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (truncated, corrupt, holds objects other than tensors and plain data, not
    a training checkpoint, bytes changed since it was written), or None if it loads and is whole. The load check
    (memory-mapped: the archive's index only) comes first: it names a truncated file as such."""
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
    return checksum_problem(path)


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
    """The newest checkpoint of the run dir that is whole (its recorded sha256) and loads. Newer ones that are not
    are reported; with ``set_aside`` (global rank 0 only) they are renamed ``*.ckpt.corrupt`` (their checksum
    ``*.ckpt.corrupt.sha256``), kept for inspection and skipped by later requeues, and ``last.ckpt`` is pointed at
    the checkpoint chosen."""
    moved = False
    for path in resume_candidates(run_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            last = run_dir / "checkpoints" / "last.ckpt"
            if moved and path.parent == last.parent and path != last:
                link_atomically(path, last)
            return path
        log.warning(
            "checkpoint %s cannot be resumed from: %s. Resuming from the previous checkpoint instead.", path, problem
        )
        if set_aside and not path.is_symlink():
            aside = path.with_name(path.name + ".corrupt")
            try:
                os.replace(path, aside)
            except OSError:  # another process moved it already
                continue
            moved = True
            if checksum_path(path).exists():
                os.replace(checksum_path(path), checksum_path(aside))
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
    from surgenet_ssl.runtime.distributed import gather_from_ranks

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


def normalize_loop_progress(checkpoint: dict[str, Any]) -> None:
    """Rewrite the saved loop counters of a checkpoint so that Lightning restores it exactly (call from
    ``LightningModule.on_load_checkpoint``, which runs before the loops are restored).

    Why: Lightning 2.6 restores a checkpoint written at the end of an epoch's last batch (a step or preemption
    checkpoint) by counting that epoch as processed, but then skips the next epoch's ``ready``/``started`` counts
    and its ``on_train_epoch_start`` hooks. Every checkpoint that run writes afterwards carries the skewed counts;
    a rerun from its epoch-end checkpoint then restarts "mid-epoch": it trains one batch past the epoch end,
    restarts the epoch and shifts every later epoch boundary (the teacher ends far from an uninterrupted run's).
    With ``trainer.max_steps`` set, Lightning restores even a clean epoch-end checkpoint that way.

    Here every checkpoint is written back into one of the two forms Lightning restores exactly, with and without
    ``max_steps``, derived from the epochs done (``processed``, plus the epoch whose last batch was just trained):

    - at an epoch boundary (the epoch's last batch was trained: ``is_last_batch``), the form of a checkpoint
      written when the next epoch starts: that epoch runs from its first batch, with its hooks. The epoch-end
      hooks of the epoch done are not replayed (Lightning does not replay them either);
    - mid-epoch, the form of a checkpoint written in ``on_train_batch_end``: the epoch started, not processed.

    Mid-epoch checkpoints of an uninterrupted run are left as they are, and the checkpoints written after the
    resume are consistent again. Checkpoints without loop state (weights only) are untouched.
    """
    fit = (checkpoint.get("loops") or {}).get("fit_loop")
    if not isinstance(fit, dict) or "epoch_progress" not in fit or "epoch_loop.batch_progress" not in fit:
        return
    epochs, batches = fit["epoch_progress"], fit["epoch_loop.batch_progress"]
    done = int(epochs["total"]["processed"])
    if batches.get("is_last_batch"):
        if batches["current"]["completed"] < batches["current"]["processed"]:  # saved in on_train_batch_end
            done += 1
            loop_state = fit.get("epoch_loop.state_dict")
            if isinstance(loop_state, dict) and "_batches_that_stepped" in loop_state:
                loop_state["_batches_that_stepped"] += 1  # the logging step the batch's end would have counted
        batches["total"]["completed"] = batches["total"]["processed"]  # every batch so far done
        batches["current"] = dict.fromkeys(batches["current"], 0)  # none of the next epoch yet
        batches["is_last_batch"] = False
        counts = {"ready": done + 1, "started": done, "processed": done, "completed": done}
    else:
        counts = {"ready": done + 1, "started": done + 1, "processed": done, "completed": done}
    for key in ("current", "total"):
        epochs[key].update(counts)

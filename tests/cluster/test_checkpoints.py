"""Checkpoints are atomic where they land, a rerun skips a newest checkpoint that does not load, last.ckpt is always
the newest and old rolling checkpoints are pruned across resumes."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from cluster.slurm_sim import TOTAL_STEPS, SlurmJob
from surgenet_ssl.runtime import checkpointing
from surgenet_ssl.runtime.checkpointing import (
    AtomicCheckpointIO,
    checkpoint_problem,
    checksum_path,
    find_resume_checkpoint,
    normalize_loop_progress,
    remove_partial_saves,
)


def test_atomic_save_writes_beside_the_destination_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    node_local_tmp = tmp_path / "node_tmp"  # $TMPDIR on another file system: must not be used
    node_local_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(node_local_tmp))
    dest = tmp_path / "run" / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, dest)
    seen_dirs = []
    real_save = torch.save

    def save_then_die(obj, f, *args, **kwargs):  # the job is killed halfway through writing
        seen_dirs.append(Path(f.file.name).parent)  # a file object: hashed while written
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpointing.torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, dest)
    monkeypatch.setattr(checkpointing.torch, "save", real_save)
    assert seen_dirs == [dest.parent]  # the temp file lives in the destination directory
    assert torch.load(dest, weights_only=False)["global_step"] == 1  # the old checkpoint, whole
    assert sorted(p.name for p in dest.parent.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]
    assert not list(node_local_tmp.iterdir())


def test_newest_checkpoint_that_does_not_load_is_reported_and_the_previous_one_used(tmp_path, caplog):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    old, new = ckpts / "step00000001.ckpt", ckpts / "step00000002.ckpt"
    torch.save({"state_dict": {}, "global_step": 1}, old)
    torch.save({"state_dict": {}, "global_step": 2}, new)
    os.utime(old, ns=(1_000_000_000, 1_000_000_000))
    new.write_bytes(new.read_bytes()[: new.stat().st_size // 2])  # truncated by a kill mid-copy
    (ckpts / "last.ckpt").symlink_to(new.name)
    assert checkpoint_problem(new).startswith("file is truncated or corrupt")
    assert find_resume_checkpoint(tmp_path, set_aside=True) == old
    assert "cannot be resumed from: file is truncated or corrupt" in caplog.text
    assert (ckpts / "step00000002.ckpt.corrupt").exists() and not new.exists()  # kept aside, not deleted
    assert find_resume_checkpoint(tmp_path) == old


@pytest.mark.slow
def test_truncated_newest_checkpoint_rerun_resumes_from_previous_and_keeps_last_ckpt_newest(tmp_path, demo_cache):
    run_dir = tmp_path / "run"
    every3 = ["callbacks.model_checkpoint.every_n_train_steps=3"]
    first = SlurmJob(tmp_path, run_dir, demo_cache, extra=["trainer.max_epochs=2", *every3]).start()
    assert first.wait() == [0], first.output()[-3000:]
    ckpts = run_dir / "checkpoints"
    newest = ckpts / "epoch0001-step00000008.ckpt"
    assert (ckpts / "last.ckpt").resolve() == newest.resolve() and (ckpts / "step00000006.ckpt").exists()
    newest.write_bytes(newest.read_bytes()[:100_000])  # killed mid-copy

    rerun = SlurmJob(tmp_path, run_dir, demo_cache, extra=every3).start()  # 3 epochs: resumes and trains on
    assert rerun.wait() == [0], rerun.output()[-3000:]
    out = rerun.output()
    assert "cannot be resumed from: file is truncated or corrupt" in out
    assert f"resumed from {ckpts / 'step00000006.ckpt'} at step 6" in out  # the previous good checkpoint
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == TOTAL_STEPS
    names = sorted(p.name for p in ckpts.glob("*.ckpt"))
    assert names == ["epoch0002-step00000012.ckpt", "last.ckpt", "step00000012.ckpt"], names  # pruned, no -v1
    assert (ckpts / "epoch0001-step00000008.ckpt.corrupt").exists()  # set aside, not deleted


def test_checkpoint_with_flipped_bytes_is_refused_by_its_checksum_and_the_previous_one_used(tmp_path, caplog):
    ckpts = tmp_path / "checkpoints"
    io = AtomicCheckpointIO()
    weights = {"w": torch.arange(250_000, dtype=torch.float32)}  # 1 MB: the middle of the file is tensor data
    old, new = ckpts / "step00000001.ckpt", ckpts / "step00000002.ckpt"
    io.save_checkpoint({"state_dict": weights, "global_step": 1}, old)
    io.save_checkpoint({"state_dict": weights, "global_step": 2}, new)
    os.utime(old, ns=(1_000_000_000, 1_000_000_000))
    (ckpts / "last.ckpt").symlink_to(new.name)
    assert checkpoint_problem(new) is None and checksum_path(new).read_text().endswith(f"  {new.name}\n")
    data = bytearray(new.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    new.write_bytes(bytes(data))  # still loads: only the checksum tells
    assert torch.load(new, weights_only=True)["global_step"] == 2

    assert find_resume_checkpoint(tmp_path, set_aside=True) == old
    assert "step00000002.ckpt cannot be resumed from: its sha256" in caplog.text
    assert (ckpts / "step00000002.ckpt.corrupt").exists() and (ckpts / "step00000002.ckpt.corrupt.sha256").exists()
    assert (ckpts / "last.ckpt").resolve() == old.resolve()  # last.ckpt: the newest checkpoint that is whole


def test_partial_saves_of_a_killed_run_are_removed_and_nothing_else(tmp_path):
    ckpts = tmp_path / "checkpoints"
    (ckpts / "archive").mkdir(parents=True)
    kept = [ckpts / "step00000002.ckpt", ckpts / "step00000002.ckpt.sha256", ckpts / "archive" / "epoch0004.ckpt"]
    partial = [ckpts / ".epoch0001-step00000008.ckpt.a1b2c3d4.tmp", ckpts / ".last.ckpt.tmp-4242"]
    partial.append(ckpts / "archive" / ".epoch0004.ckpt.x9y8z7w6.tmp")
    for path in kept + partial:
        path.write_bytes(b"x")
    assert sorted(remove_partial_saves(tmp_path)) == sorted(partial)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in partial)


def _loops(epoch: tuple[int, int, int, int], batch: tuple[int, int, int, int], last: bool, stepped: int) -> dict:
    """Saved loop state; progress counts given as (ready, started, processed, completed)."""
    keys = ("ready", "started", "processed", "completed")
    epochs, batches = dict(zip(keys, epoch, strict=True)), dict(zip(keys, batch, strict=True))
    fit = {
        "epoch_progress": {"total": dict(epochs), "current": dict(epochs)},
        "epoch_loop.batch_progress": {"total": dict(batches), "current": dict(batches), "is_last_batch": last},
        "epoch_loop.state_dict": {"_batches_that_stepped": stepped},
    }
    return {"loops": {"fit_loop": fit}}


def _normalized(ckpt: dict) -> dict:
    normalize_loop_progress(ckpt)
    return ckpt


def test_loop_counters_are_normalized_to_the_forms_lightning_restores_exactly():
    # Epoch 1 (of 4 batches) done: the step checkpoint of its last batch, its epoch-end checkpoint, and the skewed
    # epoch-end checkpoint Lightning writes after resuming from a last-batch checkpoint all restore alike: epoch 2
    # starts from its first batch.
    step_on_last_batch = _normalized(_loops((2, 2, 1, 1), (4, 4, 4, 3), True, 7))
    epoch_end = _normalized(_loops((2, 2, 2, 1), (4, 4, 4, 4), True, 8))
    skewed_epoch_end = _normalized(_loops((1, 1, 2, 1), (4, 4, 4, 4), True, 8))
    assert step_on_last_batch == epoch_end == skewed_epoch_end
    fit = epoch_end["loops"]["fit_loop"]
    assert fit["epoch_progress"]["current"] == {"ready": 3, "started": 2, "processed": 2, "completed": 2}
    assert fit["epoch_loop.batch_progress"]["current"] == {"ready": 0, "started": 0, "processed": 0, "completed": 0}
    assert not fit["epoch_loop.batch_progress"]["is_last_batch"]
    # Mid-epoch 1: a skewed checkpoint becomes the consistent one, which is left as it is.
    consistent = _loops((2, 2, 1, 1), (2, 2, 2, 1), False, 5)
    assert _normalized(_loops((1, 1, 1, 1), (2, 2, 2, 1), False, 5)) == _normalized(copy.deepcopy(consistent))
    assert _normalized(copy.deepcopy(consistent)) == consistent

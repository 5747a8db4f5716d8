"""Checkpoints are atomic where they land, a rerun skips a newest checkpoint that does not load, last.ckpt is always
the newest and old rolling checkpoints are pruned across resumes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cluster.slurm_sim import TOTAL_STEPS, SlurmJob
from surgenet_ssl import checkpointing
from surgenet_ssl.checkpointing import AtomicCheckpointIO, checkpoint_problem, find_resume_checkpoint


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

"""Kill-and-resume and SLURM preemption/requeue with the real entry point (CPU, demo data)."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from support.cli import FAST_TRAIN, TINY_BACKBONE_ARGS, run_module

# 3 epochs x 4 steps = 12 optimizer steps; a step checkpoint after every step. A tiny timm backbone: what is tested
# is the resume (CaFormer-S18's ~0.5 GB checkpoints made this test 45 s; the CaFormer path is tested elsewhere).
RESUME_ARGS = [
    *FAST_TRAIN,
    *TINY_BACKBONE_ARGS,
    "data.steps_per_epoch=4",
    "trainer.max_epochs=3",
    "logger=csv",
    "logger.csv.flush_logs_every_n_steps=1",
    "callbacks.model_checkpoint.every_n_train_steps=1",
    "callbacks.knn_monitor.every_n_epochs=0",
]


def _start(run_dir: Path, cache: Path, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "SURGENET_SSL_CACHE": str(cache), "WANDB_MODE": "offline", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "surgenet_ssl.train", f"hydra.run.dir={run_dir}", *RESUME_ARGS],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        cwd=str(cache.parent),
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"training ended (rc={proc.returncode}) before the awaited state:\n{proc.stdout.read()[-4000:]}"
            )
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("timed out waiting for training to reach the awaited state")


def _final_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]


def _step_checkpoints(run_dir: Path) -> list[Path]:
    return [p for p in (run_dir / "checkpoints").glob("step*.ckpt")] if (run_dir / "checkpoints").is_dir() else []


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_rerun_resumes_to_final_step(demo_cache, tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, demo_cache)
    _wait_for(lambda: any(p.name >= "step00000003" for p in _step_checkpoints(run_dir)), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = max(int(p.stem[4:]) for p in _step_checkpoints(run_dir))
    assert killed_at < 12, "the run finished before it could be killed"

    rerun = run_module("surgenet_ssl.train", f"hydra.run.dir={run_dir}", *RESUME_ARGS, cache=demo_cache)
    log = rerun.stdout + rerun.stderr
    assert "resumed from" in log and f"at step {killed_at}" in log
    assert _final_step(run_dir) == 12
    assert (run_dir / "export" / "demo_test_resnet_epoch0003_teacher.pth").is_file()
    # The metrics of the killed run are kept and the resumed run appends to them.
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    steps = {int(r["step"]) for r in rows if r.get("train/loss")}
    assert 0 in steps and set(range(killed_at, 12)) <= steps  # (rows not yet flushed at the kill are lost)


# The kill series below: 3 epochs x 4 steps, a step checkpoint every 2 steps, so that a step checkpoint falls on an
# epoch's last batch (step 4, 8) and one falls mid-epoch after an epoch checkpoint (step 10). Small crops and head,
# no loader workers: the run's start dominates (each run is a new process).
KILL_SERIES_ARGS = [
    *TINY_BACKBONE_ARGS,
    "data.batch_size=4",
    "data.num_workers=0",
    "data.steps_per_epoch=4",
    "trainer.max_epochs=3",
    "trainer.enable_progress_bar=false",
    "dino.out_dim=64",
    "dino.head.hidden_dim=32",
    "dino.head.bottleneck_dim=16",
    "dino.crops.global_size=32",
    "dino.crops.local_size=16",
    "dino.crops.local_number=2",
    "logger=csv",
    "export.enabled=false",
    "callbacks.knn_monitor.every_n_epochs=0",
    "callbacks.model_checkpoint.every_n_train_steps=2",
]


def _teacher(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("teacher.")}


def _kill_at(run_dir: Path, cache: Path, hook: str, step: int, extra: tuple[str, ...] = ()) -> str:
    """Run training until ``hook`` at optimizer ``step`` (support.kill_point), SIGKILL it there; its output."""
    marker = run_dir.parent / f"hold-{hook}-{step}"
    tests_dir = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "SURGENET_SSL_CACHE": str(cache), "WANDB_MODE": "offline"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p)
    hold = [
        "+callbacks.hold._target_=support.kill_point.HoldAt",
        f"+callbacks.hold.hook={hook}",
        f"+callbacks.hold.step={step}",
        f"+callbacks.hold.marker={marker}",
    ]
    log = run_dir.parent / f"log-{hook}-{step}.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "surgenet_ssl.train", f"hydra.run.dir={run_dir}", *KILL_SERIES_ARGS, *extra, *hold],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(cache.parent),
            start_new_session=True,  # its own process group: the kill takes any helper process with it
        )
        deadline = time.time() + 300
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    output = log.read_text()
    assert marker.exists(), f"training did not reach {hook} at step {step} (rc={proc.returncode}):\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def uninterrupted_teacher(demo_cache, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The teacher at the end of the kill series' run without interruption (run once for this module)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_module("surgenet_ssl.train", f"hydra.run.dir={run_dir}", *KILL_SERIES_ARGS, cache=demo_cache)
    return _teacher(run_dir / "checkpoints" / "last.ckpt")


def _assert_same_teacher(expected: dict[str, torch.Tensor], ckpt: Path) -> None:
    got = _teacher(ckpt)
    assert expected.keys() == got.keys()
    differ = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differ, f"{len(differ)} teacher tensors differ from the uninterrupted run's, e.g. {differ[:3]}"


def _newest(ckpts: Path) -> Path:
    return max((p for p in ckpts.glob("*.ckpt") if not p.is_symlink()), key=lambda p: p.stat().st_mtime_ns)


def _supersede_steps(log: str) -> list[tuple[int, int]]:
    """(pruned step, newer step) of every "removed X (superseded by Y)" line."""
    found = re.findall(r"removed \S*step(\d+)\.ckpt \(superseded by \S*step(\d+)\.ckpt\)", log)
    return [(int(old), int(new)) for old, new in found]


@pytest.mark.slow
def test_sigkill_anywhere_then_rerun_ends_with_the_uninterrupted_teacher(demo_cache, tmp_path, uninterrupted_teacher):
    """Killed on an epoch's last batch (before its epoch checkpoint), right after an epoch end and mid-epoch, a
    partial save left behind: the rerun chain ends with the uninterrupted run's teacher, bit for bit."""
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"

    # Killed after the step checkpoint of epoch 0's last batch, before the epoch checkpoint.
    logs = [_kill_at(run_dir, demo_cache, "on_train_epoch_end", 4)]
    assert _newest(ckpts).name == "step00000004.ckpt" and not list(ckpts.glob("epoch*"))
    partial = ckpts / ".epoch0000-step00000004.ckpt.k1ll3d0a.tmp"  # what a kill mid-save leaves (atomic_path)
    partial.write_bytes(b"PK\x03\x04" + bytes(100_000))

    # Resumed from that step checkpoint; killed right after epoch 1 ended (its epoch checkpoint is the newest).
    logs.append(_kill_at(run_dir, demo_cache, "on_train_batch_start", 8))
    assert f"resumed from {ckpts / 'step00000004.ckpt'} at step 4" in logs[-1]
    assert not partial.exists() and "the partial save of a killed run" in logs[-1]
    assert _newest(ckpts).name == "epoch0001-step00000008.ckpt"
    assert (ckpts / "last.ckpt").resolve() == _newest(ckpts).resolve()

    # Resumed from the epoch checkpoint written by a run that resumed on a last batch; killed mid-epoch 2, where a
    # step checkpoint is the newest file and the epoch checkpoint resumed from is kept as the fallback.
    logs.append(_kill_at(run_dir, demo_cache, "on_train_batch_start", 10))
    assert f"resumed from {ckpts / 'epoch0001-step00000008.ckpt'} at step 8" in logs[-1]
    assert (ckpts / "last.ckpt").resolve() == (ckpts / "step00000010.ckpt").resolve()
    assert (ckpts / "epoch0001-step00000008.ckpt").is_file()

    # Resumed from step 10, newer than the epoch checkpointer's previous file (step 8), to the end.
    final = run_module("surgenet_ssl.train", f"hydra.run.dir={run_dir}", *KILL_SERIES_ARGS, cache=demo_cache)
    logs.append(final.stdout + final.stderr)
    assert f"resumed from {ckpts / 'step00000010.ckpt'} at step 10" in logs[-1]
    pruned = [pair for log in logs for pair in _supersede_steps(log)]
    assert pruned and all(old < new for old, new in pruned), f"a checkpoint was pruned for an older one: {pruned}"

    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 12 and (ckpts / "last.ckpt").resolve() == _newest(ckpts).resolve()
    _assert_same_teacher(uninterrupted_teacher, ckpts / "last.ckpt")


@pytest.mark.slow
def test_epoch_end_checkpoint_under_max_steps_resumes_exactly(demo_cache, tmp_path, uninterrupted_teacher):
    """With ``trainer.max_steps`` set, Lightning restores even a clean epoch-end checkpoint as an unfinished epoch
    (one batch too many, every later epoch boundary shifted)."""
    max_steps = ("trainer.max_steps=12",)  # the 3 epochs' 12 steps: the same run and schedules
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    _kill_at(run_dir, demo_cache, "on_train_batch_start", 4, extra=max_steps)  # right after epoch 0 ended
    assert _newest(ckpts).name == "epoch0000-step00000004.ckpt"
    final = run_module(
        "surgenet_ssl.train", f"hydra.run.dir={run_dir}", *KILL_SERIES_ARGS, *max_steps, cache=demo_cache
    )
    assert f"resumed from {ckpts / 'epoch0000-step00000004.ckpt'} at step 4" in final.stdout + final.stderr
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 12
    _assert_same_teacher(uninterrupted_teacher, ckpts / "last.ckpt")

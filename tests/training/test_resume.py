"""Kill-and-resume and SLURM preemption/requeue with the real entry point (CPU, demo data)."""

from __future__ import annotations

import csv
import os
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

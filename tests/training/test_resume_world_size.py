"""A run keeps its recipe when it resumes on another number of ranks: the schedules are a function of training
progress (epochs done), not of the absolute step (which means something else once the global batch changes), the
lr is rescaled for the new global batch, and the model card counts the frames really trained on."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import pytest

from support.cli import FAST_TRAIN, TINY_BACKBONE_ARGS, run_module

# 36 demo frames (fraction 0.2), epochs of 28 (the demo's source weights), batch 4: 7 optimizer steps per epoch on 1
# rank, 3 on 2 ranks (the epoch's length follows the world size). 2 epochs, no warmups: at the epoch boundary every
# cosine is at its midpoint.
ARGS = [
    *FAST_TRAIN,
    *TINY_BACKBONE_ARGS,
    "data.num_workers=0",
    "data.steps_per_epoch=null",
    "dataset.fraction=0.2",
    "trainer.max_epochs=2",
    "logger=csv",
    "logger.csv.flush_logs_every_n_steps=1",
    "callbacks.model_checkpoint.every_n_train_steps=1",
    "callbacks.model_checkpoint.save_top_k=-1",
    "callbacks.knn_monitor.every_n_epochs=0",
    "dino.optimizer.warmup_epochs=0",
    "dino.loss.warmup_teacher_temp_epochs=0",
    "dino.optimizer.min_lr=0.0",
]


def _rows(run_dir: Path) -> list[dict[str, str]]:
    return [r for r in csv.DictReader(open(run_dir / "csv" / "metrics.csv")) if r.get("train/lr")]


def _per_epoch(run_dir: Path, epoch: int) -> int:
    return sum(1 for r in _rows(run_dir) if int(float(r["epoch"])) == epoch)


def _resume_on(devices: int, source: Path, step: int, run_dir: Path, cache: Path) -> list[dict[str, str]]:
    (run_dir / "checkpoints").mkdir(parents=True)
    found = sorted((source / "checkpoints").glob(f"*step{step:08d}.ckpt"))
    assert found, sorted(p.name for p in (source / "checkpoints").iterdir())
    step_ckpt = next((p for p in found if p.name.startswith("step")), found[0])  # the step one, if both exist
    shutil.copy(step_ckpt, run_dir / "checkpoints" / step_ckpt.name)
    trainer = ["trainer=ddp_cpu", f"trainer.devices={devices}"] if devices > 1 else ["trainer=cpu"]
    proc = run_module("surgenet_ssl.train", f"hydra.run.dir={run_dir}", *ARGS, *trainer, cache=cache, timeout=900)
    assert "resumed with another global batch or epoch length" in proc.stdout + proc.stderr
    return [r for r in _rows(run_dir) if int(r["step"]) >= step]


@pytest.mark.slow
@pytest.mark.parametrize(("first", "then"), [(1, 2), (2, 1)])
def test_resume_on_another_world_size_continues_the_schedules_at_the_same_progress(
    demo_cache: Path, tmp_path: Path, first: int, then: int
) -> None:
    before = tmp_path / "before"
    trainer = ["trainer=ddp_cpu", f"trainer.devices={first}"] if first > 1 else ["trainer=cpu"]
    run_module("surgenet_ssl.train", f"hydra.run.dir={before}", *ARGS, *trainer, cache=demo_cache, timeout=900)
    steps_per_epoch = _per_epoch(before, 0)
    rows = _rows(before)
    # the uninterrupted run at the end of epoch 1 (its last step of epoch 0 is step spe - 1; the next one is at 1.0)
    at_boundary = next(r for r in rows if int(r["step"]) == steps_per_epoch)
    resumed = _resume_on(then, before, steps_per_epoch, tmp_path / "after", demo_cache)
    first_resumed = resumed[0]
    assert int(float(first_resumed["epoch"])) == 1
    peak_before = float(rows[0]["train/lr"])  # no warmup: the first step runs at the peak (scaled to its batch)
    peak_after = peak_before * then / first  # the recipe's linear scaling rule for the new global batch
    # every schedule is where the uninterrupted run was at the same progress (epoch 1 of 2: cosine midpoints)
    assert float(first_resumed["train/lr"]) == pytest.approx(peak_after / 2, rel=1e-6)
    assert float(at_boundary["train/lr"]) == pytest.approx(peak_before / 2, rel=1e-6)
    for key in ("train/teacher_momentum", "train/weight_decay", "train/teacher_temp"):
        assert float(first_resumed[key]) == pytest.approx(float(at_boundary[key]), rel=1e-9), key
    # and the schedules still end where the recipe ends them (not clamped at the end from the first resumed step)
    last = resumed[-1]
    assert float(last["train/lr"]) < float(first_resumed["train/lr"]) / 2
    assert float(last["train/teacher_momentum"]) > float(first_resumed["train/teacher_momentum"])
    card = next((tmp_path / "after" / "export").glob("*_epoch0002_README.md")).read_text()
    after_steps = len(resumed)
    seen = steps_per_epoch * 4 * first + after_steps * 4 * then
    assert f"= {seen:,} frames seen" in card


def _trace(run_dir: Path) -> list[dict]:
    import json

    rows = []
    for f in sorted((run_dir / "batch_trace").glob("rank*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines()]
    return rows


@pytest.mark.slow
@pytest.mark.parametrize(("first", "then", "stop"), [(1, 2, 3), (1, 2, 4), (2, 1, 2)])
def test_a_mid_epoch_resume_on_another_world_size_uses_every_frame_of_the_epoch_once(
    demo_cache: Path, tmp_path: Path, first: int, then: int, stop: int
) -> None:
    """Elastic: the epoch goes on after the frames the interrupted run consumed, through Lightning's loop (also when
    the batches done so far equal a whole epoch of the new layout, where Lightning would end the epoch at once)."""
    trace = ["callbacks.batch_trace.enabled=true", "trainer.max_epochs=1"]
    before = tmp_path / "before"
    trainer = ["trainer=ddp_cpu", f"trainer.devices={first}"] if first > 1 else ["trainer=cpu"]
    proc = run_module(
        "surgenet_ssl.train", f"hydra.run.dir={before}", *ARGS, *trace, *trainer, cache=demo_cache, timeout=900
    )
    frames = int(re.search(r"epochs of (\d+) frames", proc.stdout + proc.stderr).group(1))  # type: ignore[union-attr]
    everything = [k for r in _trace(before) for k in r["keys"]]
    assert len(everything) == len(set(everything))  # one epoch: every frame once (36 frames, whole batches)
    after = tmp_path / "after"
    (after / "checkpoints").mkdir(parents=True)
    found = sorted((before / "checkpoints").glob(f"*step{stop:08d}.ckpt"))
    step_ckpt = next(p for p in found if p.name.startswith("step"))
    shutil.copy(step_ckpt, after / "checkpoints" / step_ckpt.name)
    trainer = ["trainer=ddp_cpu", f"trainer.devices={then}"] if then > 1 else ["trainer=cpu"]
    run_module("surgenet_ssl.train", f"hydra.run.dir={after}", *ARGS, *trace, *trainer, cache=demo_cache, timeout=900)
    used_before = [k for r in _trace(before) if r["step"] < stop for k in r["keys"]]
    used_after = [k for r in _trace(after) for k in r["keys"]]
    assert not set(used_before) & set(used_after)  # nothing repeated
    assert len(used_after) == len(set(used_after))
    g_new = 4 * then
    # the rest of the epoch in whole global batches of the new layout, whose epoch is its frames' whole global
    # batches (the last incomplete one dropped, as DistributedSampler(drop_last=True) does)
    remaining = max(0, frames // g_new * g_new - len(used_before))
    assert len(used_after) == remaining // g_new * g_new, (frames, len(used_before), len(used_after))

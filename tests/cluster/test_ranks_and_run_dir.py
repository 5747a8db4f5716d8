"""Several ranks never hang on one rank's failure; one training per run dir; rank-0-only run-dir files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.slurm_sim import SlurmJob
from surgenet_ssl.runtime.cluster import RunDirInUseError, RunDirLock

SUPPORT = Path(__file__).resolve().parents[1] / "support"


@pytest.mark.slow
def test_non_finite_loss_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SUPPORT / "ddp_nonfinite.py"), str(tmp_path)], capture_output=True, text=True, timeout=240
    )
    results = {r: (tmp_path / f"rank{r}.txt").read_text() for r in (0, 1) if (tmp_path / f"rank{r}.txt").exists()}
    assert set(results) == {0, 1}, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank, text in results.items():
        assert text.startswith("stopped at step 2:") and "optimizer step 2" in text, (rank, text)
    assert "DINO loss is nan" in results[1] and "not finite on another rank" in results[0]


def test_run_dir_lock_refuses_a_second_training_naming_the_first(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    first = RunDirLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(RunDirInUseError, match=rf"in use by another training \(host .*pid {os.getpid()}"):
            RunDirLock(tmp_path).acquire()
    finally:
        first.release()
    second = RunDirLock(tmp_path)  # released: free again
    second.acquire()
    second.release()


def test_run_dir_lock_of_a_dead_process_is_free(tmp_path):
    code = (
        "from surgenet_ssl.runtime.cluster import RunDirLock; "
        f"RunDirLock({str(tmp_path)!r}).acquire(); import os; os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert (tmp_path / ".train.lock").exists()  # the file stays, the lock does not
    lock = RunDirLock(tmp_path)
    lock.acquire()
    lock.release()


def test_requeued_run_of_the_same_slurm_job_takes_over(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    old = RunDirLock(tmp_path)
    old.acquire()  # the previous run of job 777, still shutting down
    try:
        start = time.monotonic()
        RunDirLock(tmp_path, takeover_wait_s=0.5).acquire()
        assert time.monotonic() - start >= 0.5
        monkeypatch.setenv("SLURM_JOB_ID", "778")  # another job: refused
        with pytest.raises(RunDirInUseError, match="slurm_job 777"):
            RunDirLock(tmp_path, takeover_wait_s=0.5).acquire()
    finally:
        old.release()


@pytest.mark.slow
def test_second_training_into_the_same_run_dir_refuses_at_once(tmp_path, demo_cache):
    run_dir = tmp_path / "run"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = SlurmJob(tmp_path / "a", run_dir, demo_cache, extra=["trainer.max_epochs=500"]).start()  # runs on
    try:
        first.wait_until(lambda: bool(first.step_checkpoints()))
        second = SlurmJob(tmp_path / "b", run_dir, demo_cache)
        second.env = lambda rank, port: {**SlurmJob.env(second, rank, port), "SLURM_JOB_ID": "999"}  # type: ignore
        start = time.monotonic()
        assert second.start().wait(timeout=120) == [1]
        assert time.monotonic() - start < 60
        out = second.output()
        assert "is in use by another training" in out and "slurm_job 4242" in out and "hydra.run.dir" in out
        assert first.procs[0].poll() is None  # the first one is untouched and still training
    finally:
        first.kill()


def test_run_dir_lock_is_not_held_by_forked_children_of_a_killed_training(tmp_path):
    """As after the OOM killer: the training's main process is SIGKILLed, its forked loader workers live on for a
    while (they notice the dead parent seconds later). The rerun must get the lock at once."""
    code = (
        "import os, signal, sys, time\n"
        "from surgenet_ssl.runtime.cluster import RunDirLock\n"
        f"RunDirLock({str(tmp_path)!r}).acquire()\n"
        "if os.fork() == 0:\n"  # a loader worker: inherits every descriptor, outlives the parent
        "    time.sleep(60); os._exit(0)\n"
        "print('locked', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert proc.wait(timeout=60) == -signal.SIGKILL
        lock = RunDirLock(tmp_path)
        lock.acquire()  # flock: "run dir ... is in use by another training" while the child lives
        lock.release()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the orphaned child

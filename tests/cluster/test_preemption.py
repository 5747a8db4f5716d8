"""SLURM preemption as the cluster really does it: the signal reaches every process of the job step (loader workers
included), the ranks agree at the next optimizer step, one checkpoint is written, rank 0 requeues, and the requeued
run resumes the same data stream exactly."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from cluster.slurm_sim import JOB_ID, TOTAL_STEPS, SlurmJob, read_trace

pytestmark = pytest.mark.slow


def _preempt_and_resume(tmp_path, demo_cache, ntasks: int, after_step: int, extra=()) -> tuple[SlurmJob, int]:
    run_dir = tmp_path / "run"
    job = SlurmJob(tmp_path, run_dir, demo_cache, ntasks=ntasks, extra=list(extra)).start()
    job.wait_until(lambda: any(s >= after_step for s in job.step_checkpoints()))
    job.signal_all()
    codes = job.wait()
    out = job.output()
    assert codes == [0] * ntasks, out[-4000:]
    assert "killed by signal" not in out and "Traceback" not in out, out[-4000:]
    assert job.requeues() == [f"requeue {JOB_ID}"]  # once, by rank 0
    preempted = sorted((run_dir / "checkpoints").glob("preempted-step*.ckpt"))
    assert len(preempted) == 1, preempted
    stopped_at = int(preempted[0].stem.rsplit("step", 1)[1])
    assert after_step <= stopped_at < TOTAL_STEPS and f"preempted at optimizer step {stopped_at}" in out
    assert (run_dir / "checkpoints" / "last.ckpt").resolve() == preempted[0].resolve()

    rerun = SlurmJob(tmp_path, run_dir, demo_cache, ntasks=ntasks, extra=list(extra)).start()  # requeued: same command
    assert rerun.wait() == [0] * ntasks, rerun.output()[-4000:]
    assert f"resumed from {preempted[0]} at step {stopped_at}" in rerun.output()
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == TOTAL_STEPS
    assert not list((run_dir / "checkpoints").glob("preempted-step*.ckpt"))  # superseded, pruned
    assert not list((run_dir / "checkpoints").glob("*-v1.ckpt"))
    return job, stopped_at


_REFERENCES: dict[tuple, object] = {}


def _uninterrupted(tmp_path_factory, demo_cache, ntasks: int, extra=()):
    """The same job without interruption (run once per configuration and shared by the tests)."""
    key = (ntasks, tuple(extra))
    if key not in _REFERENCES:
        tmp = tmp_path_factory.mktemp("reference")
        job = SlurmJob(tmp, tmp / "run", demo_cache, ntasks=ntasks, extra=list(extra))
        assert job.start().wait() == [0] * ntasks, job.output()[-4000:]
        _REFERENCES[key] = tmp / "run"
    return _REFERENCES[key]


GPU_AUGMENT = ("data.augment_on=gpu", "data.gpu_frame_size=[40,64]")  # crops made by the module from a generator


@pytest.mark.parametrize(
    ("after_step", "extra"),
    [(1, ()), (5, ()), (5, GPU_AUGMENT)],
    ids=["epoch0", "mid-epoch1", "gpu-augment-mid-epoch1"],
)
def test_signal_to_whole_job_with_workers_checkpoints_requeues_and_resumes_exactly(
    tmp_path, tmp_path_factory, demo_cache, after_step, extra
):
    _, stopped_at = _preempt_and_resume(tmp_path, demo_cache, ntasks=1, after_step=after_step, extra=extra)
    ref_dir = _uninterrupted(tmp_path_factory, demo_cache, ntasks=1, extra=extra)
    reference = read_trace(ref_dir)
    resumed = read_trace(tmp_path / "run")
    assert sorted(resumed) == list(range(TOTAL_STEPS)) == sorted(reference)
    for step in range(TOTAL_STEPS):  # same frames, same crops, in the same order, before and after the requeue
        assert resumed[step] == reference[step], f"step {step} differs (stopped at {stopped_at})"
    final = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    ref = torch.load(ref_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for name, value in ref["state_dict"].items():  # weights too: RNG streams (drop path, ...) continued
        torch.testing.assert_close(final["state_dict"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_two_ranks_agree_save_once_and_resume_the_same_stream(tmp_path, tmp_path_factory, demo_cache):
    _preempt_and_resume(tmp_path, demo_cache, ntasks=2, after_step=5)
    ref_dir = _uninterrupted(tmp_path_factory, demo_cache, ntasks=2)
    for rank in (0, 1):
        assert read_trace(tmp_path / "run", rank) == read_trace(ref_dir, rank)
    assert read_trace(ref_dir, 0)[0][0] != read_trace(ref_dir, 1)[0][0]  # the ranks read different frames


def test_submitit_signal_goes_through_submitit_requeue(tmp_path, demo_cache):
    """hydra/launcher=submitit_slurm: USR2 and submitit's own handler, called once the checkpoint is written."""
    run_dir = tmp_path / "run"
    marker = tmp_path / "submitit_handler_called"
    # A stand-in for submitit's job environment: a USR2 handler from a module named submitit..., installed before
    # training starts (as submitit does before calling the job function).
    shim = tmp_path / "shim"
    (shim / "submitit_fake").mkdir(parents=True)
    (shim / "submitit_fake" / "__init__.py").write_text(
        "import signal\n"
        "def checkpoint_and_try_requeue(signum, frame):\n"
        f"    open({str(marker)!r}, 'w').write(str(signum))\n"
        "    raise SystemExit(0)\n"
    )
    (shim / "sitecustomize.py").write_text(
        "import signal, submitit_fake\nsignal.signal(signal.SIGUSR2, submitit_fake.checkpoint_and_try_requeue)\n"
    )
    job = SlurmJob(tmp_path, run_dir, demo_cache, ntasks=1)
    slurm_env = job.env

    def env_with_submitit(rank: int, port: int) -> dict[str, str]:
        env = slurm_env(rank, port)
        env["PYTHONPATH"] = os.pathsep.join([str(shim), env.get("PYTHONPATH", "")])
        return env

    job.env = env_with_submitit  # type: ignore[method-assign]
    job.start()
    job.wait_until(lambda: any(s >= 2 for s in job.step_checkpoints()))
    job.signal_all(sig=signal.SIGUSR2)
    assert job.wait() == [0], job.output()[-4000:]
    assert marker.read_text() == str(int(signal.SIGUSR2))
    assert job.requeues() == []  # submitit requeues, not our scontrol call
    assert len(list((run_dir / "checkpoints").glob("preempted-step*.ckpt"))) == 1

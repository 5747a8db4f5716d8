"""Run the real training entry point the way SLURM does: one process per task with SLURM's environment, all tasks
and their loader workers in one process group (what `--signal=USR1@120` without `B:` signals), a fake `scontrol`
that records what it was asked, and a shared run dir."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# A tiny timm backbone, small crops and head: seconds per epoch on 2 cores; 3 epochs x 4 steps; a step checkpoint
# after every step (to watch progress) and the batch trace on (to compare data streams).
TINY_RUN = [
    "backbone=timm",
    "backbone.timm_name=test_resnet",
    "backbone.drop_path_rate=0.0",
    "data.batch_size=4",
    "data.num_workers=2",
    "data.steps_per_epoch=4",
    "data.shuffle_buffer=16",
    "trainer.max_epochs=3",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "dino.out_dim=64",
    "dino.head.hidden_dim=32",
    "dino.head.bottleneck_dim=16",
    "dino.crops.global_size=32",
    "dino.crops.local_size=16",
    "dino.crops.local_number=2",
    "logger=csv",
    "callbacks.knn_monitor.every_n_epochs=0",
    "callbacks.model_checkpoint.every_n_train_steps=1",
    "callbacks.batch_trace.enabled=true",
    "export.enabled=false",
]
TOTAL_STEPS = 12
JOB_ID = "4242"
LAUNCHER = Path(__file__).with_name("task_launcher.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmJob:
    """One SLURM job step of ``ntasks`` training tasks on this machine (rank i = task i)."""

    def __init__(self, tmp: Path, run_dir: Path, cache: Path, ntasks: int = 1, extra: list[str] | None = None) -> None:
        self.tmp, self.run_dir, self.cache, self.ntasks, self.extra = tmp, run_dir, cache, ntasks, extra or []
        self.bin = tmp / "bin"
        self.bin.mkdir(exist_ok=True)
        self.calls = tmp / "scontrol_calls.txt"
        (self.bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {self.calls}\n')
        (self.bin / "scontrol").chmod(0o755)
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def env(self, rank: int, port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))}
        env.update(
            {
                "PATH": f"{self.bin}:{os.environ['PATH']}",
                "SURGENET_SSL_CACHE": str(self.cache),
                "WANDB_MODE": "offline",
                "SLURM_JOB_ID": JOB_ID,
                "SLURM_JOB_NAME": "surgenet-ssl",
                "SLURM_NTASKS": str(self.ntasks),
                "SLURM_NTASKS_PER_NODE": str(self.ntasks),
                "SLURM_NNODES": "1",
                "SLURM_NODELIST": "localhost",
                "SLURM_PROCID": str(rank),
                "SLURM_LOCALID": str(rank),
                "SLURM_NODEID": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
            }
        )
        return env

    def start(self) -> SlurmJob:
        port = free_port()
        trainer = ["trainer=ddp_cpu", f"trainer.devices={self.ntasks}"] if self.ntasks > 1 else ["trainer=cpu"]
        args = [
            sys.executable,
            "-m",
            "surgenet_ssl.train",
            f"hydra.run.dir={self.run_dir}",
            *TINY_RUN,
            *trainer,
            *self.extra,
        ]
        stamp = time.monotonic_ns()
        self.logs = [self.tmp / f"task{rank}-{stamp}.log" for rank in range(self.ntasks)]
        self.codes_file = self.tmp / f"codes-{stamp}.json"
        spec = self.tmp / f"spec-{stamp}.json"
        spec.write_text(
            json.dumps(
                {
                    "args": args,
                    "envs": [self.env(r, port) for r in range(self.ntasks)],
                    "logs": [str(p) for p in self.logs],
                    "cwd": str(self.cache.parent),
                    "codes": str(self.codes_file),
                }
            )
        )
        for log in self.logs:
            log.touch()
        # The launcher leads a new process group, like a job step: signalling the group reaches every task and
        # every loader worker.
        self.procs = [subprocess.Popen([sys.executable, str(LAUNCHER), str(spec)], start_new_session=True)]
        return self

    def output(self, rank: int = 0) -> str:
        return self.logs[rank].read_text()

    def signal_all(self, sig: int = signal.SIGUSR1) -> None:
        """What SLURM does before preemption / the time limit: every process of the step, workers included."""
        os.killpg(os.getpgid(self.procs[0].pid), sig)

    def wait_until(self, predicate, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            if any(p.poll() is not None for p in self.procs):
                raise AssertionError(f"a task ended before the awaited state:\n{self.output()[-5000:]}")
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"timed out waiting:\n{self.output()[-5000:]}")

    def wait(self, timeout: float = 600) -> list[int]:
        """The tasks' exit codes."""
        try:
            self.procs[0].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"task did not end:\n{self.output()[-5000:]}") from None
        return json.loads(self.codes_file.read_text())

    def kill(self) -> None:
        try:
            os.killpg(os.getpgid(self.procs[0].pid), signal.SIGKILL)
        except ProcessLookupError:
            pass

    def step_checkpoints(self) -> list[int]:
        d = self.run_dir / "checkpoints"
        return sorted(int(p.stem[4:]) for p in d.glob("step*.ckpt")) if d.is_dir() else []

    def requeues(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []


def read_trace(run_dir: Path, rank: int = 0) -> dict[int, tuple]:
    """step -> (keys, crop hash) of the batches rank ``rank`` trained on (a rerun overwrites the steps it redoes)."""
    out: dict[int, tuple] = {}
    path = run_dir / "batch_trace" / f"rank{rank}.jsonl"
    for line in path.read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = (tuple(row["keys"]), row["crops_sha1"])
    return out

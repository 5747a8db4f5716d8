"""What a training process needs to behave well on a SLURM cluster: preemption signals, requeue, one run per dir.

Why it is built this way (how SLURM really behaves):
- ``#SBATCH --signal=USR1@120`` (without ``B:``) signals *every* process of the job step, DataLoader workers
  included, and submitit uses USR2 the same way. A signal handler may run in the middle of anything, so it only
  sets a flag (:class:`PreemptionSignals`); the ranks agree on the flag at the next optimizer step and save one
  checkpoint from normal code (see ``DINOModule.on_before_optimizer_step`` and ``callbacks.PreemptionCheckpoint``).
  Loader workers ignore the signals (:func:`ignore_preemption_signals_in_worker`).
- The requeue happens after training has stopped and the checkpoint is on disk: ``scontrol requeue`` for sbatch
  jobs, or submitit's own handler (which also records its requeue count) for ``hydra/launcher=submitit_slurm``.
- A run dir is used by one training at a time (:class:`RunDirLock`): a second one refuses to start, naming the
  first; a lock of a dead process is free (a POSIX record lock, released by the kernel and never held by forked
  loader workers), and a requeued run of the same SLURM job takes over.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# sbatch --signal=USR1@120 (our templates) and submitit's default preemption signal (SUBMITIT_PREEMPT_SIGNAL).
DEFAULT_SIGNALS = ("SIGUSR1", "SIGUSR2")


def _signum(name: str | int) -> signal.Signals:
    if isinstance(name, int):
        return signal.Signals(name)
    text = str(name).upper()
    text = text if text.startswith("SIG") else f"SIG{text}"
    try:
        return signal.Signals[text]
    except KeyError:
        raise ValueError(f"unknown signal {name!r} in cluster.preemption_signals (use e.g. SIGUSR1, USR2)") from None


def is_global_rank_zero() -> bool:
    """Whether this process is global rank 0, decided from the environment before Lightning starts: SLURM tasks
    (SLURM_PROCID), torchrun (RANK), Lightning's DDP children (LOCAL_RANK / NODE_RANK)."""
    if "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_PROCID", "0") != "0":
        return False
    return all(os.environ.get(var, "0") in ("0", "") for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"))


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for array jobs, else the job id."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


class PreemptionSignals:
    """Process-wide flag set by the preemption signals; nothing else happens inside the handler.

    ``install`` keeps the handlers that were there before (e.g. submitit's) so that :meth:`requeue` can hand the
    requeue to them once the checkpoint is written.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}
        self.signals: tuple[signal.Signals, ...] = ()

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signum  # only a flag: the ranks agree on it at the next optimizer step

    def install(self, names: Iterable[str | int] = DEFAULT_SIGNALS) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self.signals = tuple(_signum(n) for n in names)
        for sig in self.signals:
            current = signal.getsignal(sig)
            if current is not self._handler:
                self.previous[int(sig)] = current
                signal.signal(sig, self._handler)

    def uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def requeue(self) -> str:
        """Requeue this job (call on global rank 0 only, after the checkpoint is saved); returns what was done."""
        signum = self.received if self.received is not None else int(self.signals[0]) if self.signals else None
        previous = self.previous.get(int(signum)) if signum is not None else None
        if callable(previous) and getattr(previous, "__module__", "").startswith("submitit"):
            log.info("handing the requeue to submitit (%s)", getattr(previous, "__qualname__", previous))
            previous(signum, None)  # checkpoints the submission, runs scontrol requeue, exits
            return "requeued by submitit"
        job = slurm_job_id()
        if not job:
            return "not requeued (not a SLURM job: rerun the same command to resume)"
        try:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            log.warning("could not requeue SLURM job %s: %s", job, err)
            return f"requeue of SLURM job {job} failed ({err}); resubmit the same command to resume"
        if result.returncode != 0:
            log.warning("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
            return f"requeue of SLURM job {job} failed (scontrol exit {result.returncode}); resubmit to resume"
        return f"requeued SLURM job {job}"


PREEMPTION = PreemptionSignals()


class TrainingPreempted(Exception):
    """Training stopped for a preemption/time-limit signal after writing ``checkpoint`` at ``step``.

    Raised by ``callbacks.PreemptionCheckpoint``; defined here, with the signals, so that the entry point can catch
    it without importing Lightning first."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"preempted at optimizer step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


def ignore_preemption_signals_in_worker(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: the job's signals reach the workers too; only the main process acts on them."""
    for sig in PREEMPTION.signals or tuple(_signum(n) for n in DEFAULT_SIGNALS):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except (ValueError, OSError):  # pragma: no cover - not the main thread of the worker
            pass


class RunDirInUseError(RuntimeError):
    """Another live training holds the run dir."""


# Run-dir locks this process holds, by (device, inode) of the lock file: POSIX record locks do not conflict within
# one process, and closing *any* descriptor of the file would drop them, so a second lock in this process is
# refused from here, without opening the file.
_HELD_HERE: dict[tuple[int, int], dict[str, Any]] = {}


class RunDirLock:
    """``<run dir>/.train.lock``: held by global rank 0 for the whole training.

    A POSIX record lock (``fcntl.lockf``): it belongs to the process alone, so forked DataLoader workers do not hold
    it (with ``flock``, workers orphaned by a SIGKILL of the main process kept the lock for seconds and the rerun
    was refused), and the kernel releases it when the process dies, so a killed or preempted run never blocks its
    rerun. The file names the holder (host, pid, SLURM job) for the error message. A requeued run of the same SLURM
    job takes over from a holder that is still shutting down (it waits ``takeover_wait_s`` for it, then proceeds).
    """

    def __init__(self, run_dir: str | Path, takeover_wait_s: float = 60.0) -> None:
        self.path = Path(run_dir) / ".train.lock"
        self.takeover_wait_s = takeover_wait_s
        self._fd: int | None = None
        self._key: tuple[int, int] | None = None
        self._me: dict[str, Any] = {}

    @staticmethod
    def _describe_self() -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job": slurm_job_id(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def _key_of(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    @staticmethod
    def _read_holder(fd: int) -> dict[str, Any]:
        try:  # through the descriptor in hand: opening the file again and closing it would drop a lock of ours
            found = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def _try_lock(self) -> tuple[int | None, dict[str, Any]]:
        """(descriptor holding the lock, {}) or (None, what is known of the holder)."""
        held = _HELD_HERE.get(self._key_of() or (-1, -1))
        if held is not None:
            return None, held
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd, {}
        except OSError:
            holder = self._read_holder(fd)
            os.close(fd)  # this process holds no lock on the file (checked above): closing drops nothing
            return None, holder

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = None
        while True:
            fd, holder = self._try_lock()
            if fd is not None:
                break
            mine = slurm_job_id()
            if mine and holder.get("slurm_job") == mine:  # our own requeued job: the old one is going away
                deadline = deadline or time.monotonic() + self.takeover_wait_s
                if time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                log.warning("run dir lock still held by the previous run of SLURM job %s; taking over", mine)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                break
            who = ", ".join(f"{k} {v}" for k, v in holder.items() if v) or "unknown process"
            raise RunDirInUseError(
                f"run dir {self.path.parent} is in use by another training ({who}). Two trainings in one run dir "
                "would interleave checkpoints, logs and exports. Wait for it to finish, stop it, or choose another "
                "dir: hydra.run.dir=DIR."
            )
        self._me = self._describe_self()
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self._me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        self._key = self._key_of()
        if self._key is not None:
            _HELD_HERE[self._key] = self._me

    def release(self) -> None:
        if self._fd is not None:
            if self._key is not None and _HELD_HERE.get(self._key) is self._me:
                del _HELD_HERE[self._key]
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

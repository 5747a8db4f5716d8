"""A full, read-only or forbidden disk ends in one message with the path and the fix; an early stop by SIGTERM
exits nonzero and says so (a job wrapper must not read success)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from support.cli import FAST_TRAIN, TINY_BACKBONE_ARGS, run_module
from surgenet_ssl.runtime import storage_errors
from surgenet_ssl.runtime.checkpointing import atomic_torch_save
from surgenet_ssl.runtime.storage_errors import RunDirFileHandler, StorageError, storage_error_message

TRAIN = [*FAST_TRAIN, *TINY_BACKBONE_ARGS, "data.num_workers=0", "callbacks.knn_monitor.every_n_epochs=0"]


def test_torch_save_on_a_full_disk_is_a_storage_error_naming_the_path(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    def failing_save(obj, f) -> None:  # noqa: ANN001 - what torch.save raises when the disk fills mid-write
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2954560 vs 2954456")

    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(3 << 20, 3 << 20, 0))  # type: ignore[attr-defined]
    target = tmp_path / "checkpoints" / "epoch0001.ckpt"
    target.parent.mkdir()
    with pytest.raises(StorageError) as err:
        atomic_torch_save({"a": 1}, target)
    msg = storage_error_message(err.value)
    assert msg is not None and msg.startswith(f"cannot write {target}: no space left on the device.")
    assert f"df -h {target.parent}" in msg and "hydra.run.dir=DIR" in msg and "rerun the same command" in msg
    assert list(target.parent.iterdir()) == []  # no partial temp file left


def test_an_unrelated_error_stays_what_it_is(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    def failing_save(obj, f) -> None:  # noqa: ANN001
        raise RuntimeError("something else")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="something else"):
        atomic_torch_save({"a": 1}, tmp_path / "x.ckpt")  # plenty of space here: not a disk problem
    assert storage_error_message(RuntimeError("x")) is None


@pytest.mark.parametrize(
    ("code", "words"),
    [(errno.EROFS, "read-only"), (errno.EACCES, "permission denied"), (errno.EDQUOT, "quota")],
)
def test_file_system_errors_say_what_and_where(code: int, words: str) -> None:
    try:
        try:
            raise OSError(code, os.strerror(code), "/runs/x/config.yaml")
        except OSError as inner:
            raise ValueError("wrapped") from inner
    except ValueError as err:
        msg = storage_error_message(err)
    assert msg is not None and msg.startswith("cannot write /runs/x/config.yaml: ") and words in msg


def test_the_log_file_of_an_unwritable_run_dir_falls_back_to_the_console(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    handler = RunDirFileHandler(str(blocker / "train.log"))  # cannot be created (as root, chmod would not stop it)
    handler.emit(logging.LogRecord("x", logging.INFO, "f", 1, "hello", None, None))
    handler.close()
    out = capsys.readouterr().out
    assert f"cannot write the log file {blocker / 'train.log'}" in out and "console only" in out


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB file system (tmpfs): what a full scratch disk is. Needs mount rights (root in a container)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_training_on_a_full_disk_ends_with_one_message(demo_cache: Path, tiny_disk: Path) -> None:
    proc = run_module("surgenet_ssl.train", f"hydra.run.dir={tiny_disk / 'run'}", *TRAIN, cache=demo_cache, check=False)
    assert proc.returncode == 1
    last = [line for line in (proc.stdout + proc.stderr).strip().splitlines() if line.strip()][-1]
    assert "cannot write" in last and str(tiny_disk / "run") in last and "no space left on the device" in last, (
        proc.stdout[-2000:] + proc.stderr[-3000:]
    )


@pytest.mark.slow
def test_sigterm_stops_training_with_a_nonzero_exit_and_says_so(demo_cache: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [
        *TRAIN,
        "data.steps_per_epoch=50",
        "trainer.max_epochs=3",
        "callbacks.model_checkpoint.every_n_train_steps=1",
    ]
    env = {**os.environ, "SURGENET_SSL_CACHE": str(demo_cache), "WANDB_MODE": "offline"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "surgenet_ssl.train", f"hydra.run.dir={run_dir}", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=str(demo_cache.parent),
    )
    deadline = time.time() + 300
    while not list((run_dir / "checkpoints").glob("*step*.ckpt")) if (run_dir / "checkpoints").is_dir() else True:
        assert proc.poll() is None and time.time() < deadline, "training ended before the signal"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "training stopped early: SIGTERM received" in out and "Rerun the same command to resume" in out


def test_module_has_no_heavy_imports() -> None:
    # The entry points import it before torch (config mistakes fail in a second).
    assert "torch" not in storage_errors.__dict__

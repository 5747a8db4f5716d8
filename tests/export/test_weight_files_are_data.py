"""Weight files never run code: a checkpoint with a pickled payload is refused by export and by resume, with a
message, and the payload never runs; our own checkpoints still load (README "Security model")."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from support.cli import run_module
from surgenet_ssl.runtime.checkpointing import checkpoint_problem, find_resume_checkpoint


class Payload:
    """Unpickling this runs ``touch <marker>`` (what an attacker's checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def _lightning_like(marker: Path | None, step: int) -> dict:
    ckpt: dict = {"state_dict": {"w": torch.ones(2)}, "global_step": step, "epoch": 0}
    if marker is not None:
        ckpt["callbacks"] = {"x": Payload(marker)}
    return ckpt


def test_export_refuses_a_checkpoint_with_a_payload(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    ckpt = tmp_path / "downloaded.ckpt"
    torch.save(_lightning_like(marker, 5), ckpt)
    proc = run_module("surgenet_ssl.export", f"ckpt={ckpt}", cache=tmp_path / "cache", check=False, timeout=300)
    assert proc.returncode == 2
    assert f"Cannot read {ckpt} with torch.load(weights_only=True)" in proc.stderr
    assert "only if you trust the file" in proc.stderr
    assert not marker.exists()


def test_resume_skips_a_checkpoint_with_a_payload_and_uses_the_previous_one(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    marker = tmp_path / "ran"
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    good, evil = ckpt_dir / "step00000004.ckpt", ckpt_dir / "step00000008.ckpt"
    torch.save(_lightning_like(None, 4), good)
    torch.save(_lightning_like(marker, 8), evil)
    os.utime(good, ns=(1, 1_000_000_000))  # evil is the newest
    assert checkpoint_problem(good) is None
    problem = checkpoint_problem(evil)
    assert problem is not None and "refused (never run)" in problem
    with caplog.at_level("WARNING"):
        assert find_resume_checkpoint(tmp_path, set_aside=True) == good
    assert f"checkpoint {evil} cannot be resumed from: it holds pickled Python objects" in caplog.text
    assert (ckpt_dir / "step00000008.ckpt.corrupt").exists() and not evil.exists()
    assert not marker.exists()

"""Real multi-process DDP on CPU (gloo): the distributed path every GPU cluster run takes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "support" / "ddp_step.py"


def _run(out: Path, devices: int, per_rank: int, steps: int) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(devices), str(per_rank), str(steps)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_double_batch_and_agree(tmp_path):
    _run(tmp_path / "ddp", devices=2, per_rank=4, steps=2)
    _run(tmp_path / "single", devices=1, per_rank=8, steps=2)
    r0 = torch.load(tmp_path / "ddp" / "rank0.pt")
    r1 = torch.load(tmp_path / "ddp" / "rank1.pt")
    single = torch.load(tmp_path / "single" / "rank0.pt")
    assert r0["world"] == 2 and r0["global_step"] == single["global_step"] == 2

    # Both ranks end with identical teacher (and student) weights and the same all-reduced center.
    for key, value in r0["teacher"].items():
        assert torch.equal(value, r1["teacher"][key]), key
    assert torch.equal(r0["center"], r1["center"])

    # One optimizer step on 2 ranks x batch 4 == 1 rank x batch 8 on the same data: the gradients the optimizer
    # applies (all-reduced, clipped per parameter) and the all-reduced center match.
    assert single["grads"].keys() == r0["grads"].keys() and len(r0["grads"]) > 10
    for key, grad in single["grads"].items():
        assert torch.allclose(r0["grads"][key], grad, rtol=1e-3, atol=1e-6 * grad.abs().max().item() + 1e-9), key
        assert torch.equal(r0["grads"][key], r1["grads"][key]), key
    assert torch.allclose(r0["center"], single["center"], atol=1e-7)
    # The logged loss is the run's (the mean over ranks), on every rank, not rank 0's own.
    for step in range(2):
        mean = (r0["local_loss"][step] + r1["local_loss"][step]) / 2
        assert r0["local_loss"][step] != r1["local_loss"][step]
        assert r0["shown_loss"][step] == pytest.approx(mean, rel=1e-6) == r1["shown_loss"][step]

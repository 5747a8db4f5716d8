"""The meta-device memory estimate of scripts/estimate_vit_memory.py: runs without a GPU or weights, and what it
says follows from how activations scale (checkpointing stores less; the per-sample part grows with crop size)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "estimate_vit_memory.py"


def _run(*args: str) -> tuple[str, dict[str, int]]:
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, check=True)
    last = out.stdout.strip().splitlines()[-1]
    return out.stdout, {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", last)}


def test_estimate_on_the_meta_device() -> None:
    small = ("--backbone", "vit_small", "--local-size", "32", "--local-number", "2", "--out-dim", "256")
    text, at_64 = _run(*small, "--global-size", "64")
    _, at_128 = _run(*small, "--global-size", "128")
    assert "activations per sample" in text and "static" in text
    assert at_64["per_gpu_batch_checkpointed"] > at_64["per_gpu_batch"] > 0  # checkpointing stores less
    assert at_128["per_gpu_batch"] < at_64["per_gpu_batch"] / 3  # 4x the tokens: over 3x the memory per sample

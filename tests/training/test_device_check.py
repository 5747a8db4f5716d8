"""scripts/device_check.sh: the one script for a lent GPU. On CPU: its plan (steps in order, each capped, all under
$OUT) and a run whose budget is spent (every step skipped with a line in the summary, the environment recorded)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "device_check.sh"


def _run(out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT)], env={**os.environ, "OUT": str(out), **env}, capture_output=True, text=True, timeout=120
    )


def test_plan_runs_the_most_wanted_steps_first_all_under_out(tmp_path) -> None:
    done = _run(tmp_path / "OUT", DRY_RUN="1")
    assert done.returncode == 0, done.stderr
    steps = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    names = [line.split(":")[0].removeprefix("step ") for line in steps]
    assert names == [
        "report",
        "demo_cpu_aug",
        "demo_gpu_aug",
        "demo_gpu_decode",
        "decode_compare",
        "data_wait",
        "compile",
    ]
    caps = [int(line.split("timeout ")[1].split("s:")[0]) for line in steps]
    assert sum(caps[:6]) < 460  # the eager parts fit the default budget; compile gets what is left
    assert all(str(tmp_path / "OUT") in line for line in steps)
    assert "data.augment_on=gpu" in steps[2] and "data.decode=gpu" in steps[3] and "--compile on" in steps[6]


def test_a_spent_budget_skips_every_step_and_still_writes_the_summary(tmp_path) -> None:
    out = tmp_path / "OUT"
    done = _run(out, BUDGET_S="5")
    assert done.returncode == 0, done.stderr
    summary = (out / "summary.txt").read_text().splitlines()
    skipped = [line.split(":")[0] for line in summary if "skipped (time budget" in line]
    assert skipped == [
        "report",
        "demo_cpu_aug",
        "demo_gpu_aug",
        "demo_gpu_decode",
        "decode_compare",
        "data_wait",
        "compile",
    ]
    assert summary[0].startswith("environment: ") and summary[-1].startswith("total: ")
    assert "/dev/shm" in (out / "env.txt").read_text()

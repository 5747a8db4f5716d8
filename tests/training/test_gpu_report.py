"""scripts/gpu_report.py: the plumbing runs on CPU (--tiny) and writes a complete report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_report.py"


@pytest.mark.slow  # three tiny Lightning runs
def test_tiny_cpu_report(tmp_path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("gpu_report", SCRIPT)
    gpu_report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_report)
    out = tmp_path / "report.json"
    report = gpu_report.main(["--tiny", "--variants", "baseline,uint8,channels_last", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [r["variant"] for r in report["steps"]] == ["baseline", "uint8", "channels_last"]
    assert all(r["images_per_s"] > 0 and r["ms_per_step"] > 0 for r in report["steps"])
    assert report["steps"][1]["uint8_crops"] and report["steps"][2]["performance.channels_last"]
    assert report["gpu_augment_frames_per_s"] > 0 and report["device"] == "CPU"
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("best_variant=") and "baseline_images_per_s=" in last

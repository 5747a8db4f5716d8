"""scripts/gpu_report.py: the plumbing runs on CPU (--tiny), prints every markdown table and ends with the summary."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_report.py"
HEADERS = (
    "| backbone | precision | compile | batch | samples/s | ms/step | peak memory (GiB) | note |",
    "| backbone | max batch | note |",
    "| backbone | augment_on | in the step | whole loop iteration | note |",
    "| backbone | augment_on | workers | data-wait fraction | ms/step | samples/s | note |",
    "| variant | ms/step | images/s |",
    "| what | value |",
)


@pytest.mark.slow  # about five tiny Lightning runs, two of them through the real loader (~40 s on 2 cores)
def test_tiny_cpu_report(tmp_path, capsys, demo_cache) -> None:
    spec = importlib.util.spec_from_file_location("gpu_report", SCRIPT)
    gpu_report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_report)
    out = tmp_path / "report.json"
    argv = ["--tiny", "--variants", "baseline,channels_last", "--cache-dir", str(demo_cache), "--out", str(out)]
    report = gpu_report.main(argv)
    stdout = capsys.readouterr().out
    lines = stdout.strip().splitlines()

    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    for header in HEADERS:  # each table: its header row, then the separator row
        assert header in lines and lines[lines.index(header) + 1] == "|" + "---|" * (header.count("|") - 1)

    # matrix: one measured CPU cell; fp16 and compile need CUDA and say so
    measured = [c for c in report["matrix"] if "samples_per_s" in c]
    assert [(c["precision"], c["compile"]) for c in measured] == [("32-true", False)]
    assert measured[0]["samples_per_s"] > 0 and measured[0]["ms_per_step"] > 0
    assert len(report["matrix"]) == 4 and all(c.get("note") == "n/a on CPU" for c in report["matrix"][1:])
    assert [r["note"] for r in report["max_batch"] + report["syncs"]] == ["n/a on CPU"] * 3
    # data wait: the real loader ran in both augmentation modes
    assert [r["augment_on"] for r in report["data_wait"]] == ["cpu", "gpu"]
    assert all(0 <= r["data_wait_fraction"] <= 1 and r["samples_per_s"] > 0 for r in report["data_wait"])
    # the older hot-path variants still work
    assert [r["variant"] for r in report["steps"]] == ["baseline", "channels_last"]
    assert not report["steps"][0]["uint8_crops"] and report["steps"][1]["performance.channels_last"]
    assert report["gpu_augment_frames_per_s"] > 0 and report["device"] == "CPU"
    assert "failed:" not in stdout

    last = lines[-1]
    assert last == report["summary"]
    fields = dict(kv.split("=", 1) for kv in last.split())
    assert list(fields) == ["best_samples_per_s", "backbone", "precision", "compile", "host_syncs_per_step"]
    assert float(fields["best_samples_per_s"]) > 0 and fields["host_syncs_per_step"] == "na"

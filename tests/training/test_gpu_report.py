"""scripts/gpu_report.py: the plumbing runs on CPU (--tiny), prints every markdown table and ends with the summary;
nothing measured is lost when the run is stopped; the time budget and the out-of-memory rule."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_report.py"
HEADERS = (
    "| backbone | precision | compile | batch | samples/s | ms/step | peak memory (GiB) | cell s | note |",
    "| backbone | max batch | note |",
    "| backbone | augment_on | in the step | whole loop iteration | note |",
    "| backbone | augment_on | workers | timed steps | data-wait fraction | after the queue | ms/step | samples/s | "
    "note |",
    "| variant | ms/step | images/s |",
    "| what | value |",
)


def _load():
    spec = importlib.util.spec_from_file_location("gpu_report", SCRIPT)
    gpu_report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_report)
    return gpu_report


@pytest.mark.slow  # about five tiny Lightning runs, two of them through the real loader (~40 s on 2 cores)
def test_tiny_cpu_report(tmp_path, capsys, demo_cache) -> None:
    gpu_report = _load()
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
    # more batches timed than the workers had queued before the first step, and the rate after the queue
    assert all(r["timed_steps"] > r["queue_slots"] and r["steady_data_wait_fraction"] >= 0 for r in report["data_wait"])
    assert report["finished"] and report["gpu_augment_ops_per_call"] <= 500
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


TINY_AUGMENT = ["--tiny", "--parts", "augment,matrix", "--precisions", "32-true", "--compile", "off"]


def test_a_stopped_run_keeps_what_it_measured(tmp_path, monkeypatch) -> None:
    gpu_report = _load()
    out_dir = tmp_path / "OUT"  # a directory, as $OUT on the device machine
    on_disk = {}

    def killed_here(*args, **kwargs):
        on_disk.update(json.loads((out_dir / "gpu_report.json").read_text()))  # what a SIGKILL now would leave
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu_report, "matrix_cell", killed_here)
    with pytest.raises(KeyboardInterrupt):
        gpu_report.main([*TINY_AUGMENT, "--out", str(out_dir)])
    # written after the augmentation part, before the matrix cell started
    assert on_disk["gpu_augment_frames_per_s"] > 0 and on_disk["gpu_augment_ops_per_call"] > 0
    assert on_disk["matrix"][0]["note"] == gpu_report.PENDING and not on_disk["finished"]
    # and on the way out (SIGTERM, Ctrl-C) the summary is added
    final = json.loads((out_dir / "gpu_report.json").read_text())
    assert final["summary"].startswith("best_samples_per_s=") and not final["finished"]
    assert not list(out_dir.glob("*.tmp"))


def test_time_budget_skips_cells_and_compile_needs_three_minutes(tmp_path, monkeypatch, capsys) -> None:
    gpu_report = _load()

    def never(*args, **kwargs):
        raise AssertionError("a cell started outside the budget")

    monkeypatch.setattr(gpu_report, "matrix_cell", never)
    monkeypatch.setattr(gpu_report, "augment_report", never)
    report = gpu_report.main([*TINY_AUGMENT, "--time-budget", "0", "--out", str(tmp_path / "r.json")])
    assert (
        report["gpu_augment_note"] == gpu_report.OVER_BUDGET and report["matrix"][0]["note"] == gpu_report.OVER_BUDGET
    )
    assert report["finished"] and json.loads((tmp_path / "r.json").read_text())["finished"]
    assert capsys.readouterr().out.strip().splitlines()[-1] == report["summary"]
    # a compile cell is not started with less than 180 s left (eager cells are)
    args = ["--tiny", "--parts", "matrix", "--precisions", "32-true", "--compile", "on", "--time-budget", "170"]
    report = gpu_report.main(args)
    assert [c["note"] for c in report["matrix"]] == [gpu_report.OVER_BUDGET]


def test_cudnn_and_cublas_allocation_failures_count_as_out_of_memory() -> None:
    gpu_report = _load()
    oom = gpu_report.is_out_of_memory
    assert oom(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert oom(RuntimeError("CUDA error: out of memory"))
    assert not oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not oom(ValueError("out of memory"))


def test_out_may_be_a_directory_and_dev_shm_is_checked(tmp_path) -> None:
    gpu_report = _load()
    assert gpu_report.report_path(str(tmp_path / "OUT")) == tmp_path / "OUT" / "gpu_report.json"
    assert (tmp_path / "OUT").is_dir()
    assert gpu_report.report_path(str(tmp_path / "a" / "r.json")) == tmp_path / "a" / "r.json"
    assert gpu_report.report_path(None) is None
    assert gpu_report.shm_check(str(tmp_path))["dev_shm_gb"] > 0
    missing = gpu_report.shm_check(str(tmp_path / "no_shm"))
    assert missing["dev_shm_gb"] is None and "loader workers may fail" in missing["dev_shm_note"]

"""``python -m surgenet_ssl.report``: runs and results found under sweep dirs, matched, tabulated and plotted."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from downstream.helpers import fake_pretraining_run
from surgenet_ssl.reporting import find_runs, make_report, parse_model_card

REPO = Path(__file__).resolve().parents[2]


def _finetune_results(
    path: Path, variants: dict, task: str = "segmentation", metric: str = "mIoU", fraction: float = 1.0
) -> Path:
    """A results.json in the format of surgenet_ssl.finetune (variants -> weights, sha256, mean/std, runs)."""
    body = {
        "kind": "finetune",
        "task": task,
        "mode": "full",
        "primary_metric": metric,
        "backbone": "timm",
        "timm_name": "test_convnext",
        "demo": False,
        "seeds": [0, 1],
        "data": {"train": {"root": "/data/cholecseg8k/train"}, "train_fraction": fraction},
        "variants": {
            name: {
                "weights": w,
                "weights_sha256": sha,
                "mean": {metric: m},
                "std": {metric: s},
                "runs": [{"seed": 0}, {"seed": 1}],
            }
            for name, (w, sha, m, s) in variants.items()
        },
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps(body))
    return path / "results.json"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sweep")
    multirun = root / "multirun" / "2026-11-25_10-00-00"
    small = fake_pretraining_run(multirun / "0_dataset=small", "small", 0.1, seed=0, knn=0.61)
    full = fake_pretraining_run(multirun / "1_dataset=surgenet", "surgenet", 1.0, seed=1, knn=0.72)
    sha = lambda p: parse_model_card((p.parent / "README.md").read_text())["files"][p.name]  # noqa: E731
    finetunes = root / "outputs"
    _finetune_results(
        finetunes / "seg_small",
        {
            "pretrained": (str(small["teacher_pth"]), sha(small["teacher_pth"]), 0.50, 0.02),
            "random_init": (None, None, 0.30, 0.01),
        },
    )
    # a copy of the file elsewhere still matches by sha256
    _finetune_results(
        finetunes / "seg_full", {"pretrained": ("/moved/teacher.pth", sha(full["teacher_pth"]), 0.60, 0.03)}
    )
    _finetune_results(
        finetunes / "phase_full",
        {"pretrained": (str(full["teacher_pth"]), None, 0.40, None)},
        task="classification",
        metric="macro_f1",
    )
    # an evaluate result with a path relative to the sweep root
    ev = finetunes / "knn_small"
    ev.mkdir()
    rel = os.path.relpath(small["teacher_pth"], root)
    (ev / "results.json").write_text(
        json.dumps(
            {
                "knn_top1": 0.8,
                "linear_probe_accuracy": 0.7,
                "weights": rel,
                "backbone": "timm",
                "timm_name": "test_convnext",
                "val": {"root": "/data/frames/val"},
            }
        )
    )
    return {"root": root, "small": small, "full": full}


def test_runs_are_found_with_their_facts(sweep):
    runs = find_runs([sweep["root"]])
    assert [r.name for r in runs] == ["small@10%_test_convnext", "surgenet_test_convnext"]
    small, full = runs
    assert small.pretrain_frames == 263_679 and full.pretrain_frames == 2_636_790  # registry counts x fraction
    assert small.epochs == 2 and small.frames_seen == 20 * 4 and small.online_knn_top1 == pytest.approx(0.61)
    assert small.command == "python -m surgenet_ssl.train dataset=small"
    assert str(sweep["small"]["teacher_pth"].resolve()) in small.teachers and small.embedding_map.is_file()


def test_report_tables_figures_and_ranks(sweep, tmp_path):
    out = tmp_path / "report"
    summary = make_report([sweep["root"]], out)
    assert summary["runs"] == 2 and summary["results"] == 4  # results.json files (one holds two variants)
    assert summary["columns"][0] == "segmentation[cholecseg8k]:mIoU (dataset-level)"
    table = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    by_model = {r["model"]: r for r in table}
    assert set(by_model) == {"small@10%_test_convnext", "surgenet_test_convnext", "random init (test_convnext)"}
    seg = "segmentation[cholecseg8k]:mIoU (dataset-level)"
    assert float(by_model["small@10%_test_convnext"][seg]) == pytest.approx(0.5)
    assert float(by_model["small@10%_test_convnext"][f"{seg} std"]) == pytest.approx(0.02)
    assert float(by_model["surgenet_test_convnext"][seg]) == pytest.approx(0.6)  # matched by sha256
    assert float(by_model["random init (test_convnext)"][seg]) == pytest.approx(0.3)
    knn, f1 = "knn[frames]:top1 (DINO k-NN)", "classification[cholecseg8k]:macro_f1 (pooled)"
    assert float(by_model["small@10%_test_convnext"][knn]) == pytest.approx(0.8)  # by relative path
    assert float(by_model["small@10%_test_convnext"]["linear_probe[frames]:accuracy (logistic)"]) == pytest.approx(0.7)
    assert float(by_model["surgenet_test_convnext"][f1]) == pytest.approx(0.4)
    assert by_model["surgenet_test_convnext"]["pretrain_frames"] == "2636790"
    md = (out / "report.md").read_text()
    assert "| small@10%_test_convnext | test_convnext | small (10%) | 263,679 |" in md
    assert "0.5000 ± 0.0200 (n=2)" in md and "![Downstream metric vs pretraining frames](scaling.png)" in md
    assert f"{seg}: surgenet_test_convnext 1, small@10%_test_convnext 2, random init (test_convnext) 3" in md
    assert "- **pooled**: all frames of the split" in md and "- **DINO k-NN**: DINO weighted k-NN" in md
    for png in ("scaling.png", "ranks.png", "tsne.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert not (out / ".partial").exists()


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "surgenet_ssl.report", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_single_run_dir_and_bad_input(sweep, tmp_path):
    run_dir = sweep["small"]["teacher_pth"].parent.parent
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    proc = _run(str(run_dir), str(tmp_path / "broken"), f"output={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"report={tmp_path / 'r' / 'report.md'}"
    assert "unreadable" in proc.stdout and (tmp_path / "r" / "report.csv").is_file()
    assert "small@10%_test_convnext" in (tmp_path / "r" / "report.md").read_text()
    proc = _run(str(tmp_path / "missing"), f"output={tmp_path / 'r2'}", cwd=tmp_path)
    assert proc.returncode == 1 and "Not a directory" in proc.stderr and not (tmp_path / "r2").exists()
    (tmp_path / "empty").mkdir()
    proc = _run(str(tmp_path / "empty"), cwd=tmp_path)
    assert proc.returncode == 1 and "No pretraining run" in proc.stderr and not (tmp_path / "empty" / "report").exists()
    assert _run(cwd=tmp_path).returncode == 2


def test_finetune_columns_name_their_convention_and_legacy_results_get_theirs(tmp_path):
    from surgenet_ssl.reporting.discover import find_results

    video = {"strict": {"accuracy": 0.7, "jaccard": 0.5}, "relaxed": {"accuracy": 0.8, "jaccard": 0.6, "f1": 0.7}}
    new = {
        "kind": "finetune",
        "task": "classification",
        "primary_metric": "macro_f1",
        "metrics": {
            "convention": {
                "macro_f1": "pooled",
                "per_video.strict": "per-video strict",
                "per_video.relaxed": "per-video relaxed",
            }
        },
        "data": {"train": {"root": "/data/cholec80/train"}},
        "variants": {"a": {"weights": None, "mean": {"macro_f1": 0.6, "per_video": video}, "std": {}, "runs": [{}]}},
    }
    legacy = {
        "kind": "finetune",
        "task": "multilabel_classification",
        "primary_metric": "mAP",
        "data": {"train": {"root": "/data/cvs/train"}},
        "variants": {"a": {"weights": None, "mean": {"mAP": 0.64}, "std": {}, "runs": [{}]}},
    }
    for name, body in (("new", new), ("legacy", legacy)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(body))
    entries, _ = find_results([tmp_path])
    columns = {c: v[0] for e in entries for c, v in e.columns.items()}
    assert columns == {
        "classification[cholec80]:macro_f1 (pooled)": 0.6,
        "classification[cholec80]:accuracy (per-video strict)": 0.7,
        "classification[cholec80]:jaccard (per-video strict)": 0.5,
        "classification[cholec80]:accuracy (per-video relaxed)": 0.8,
        "classification[cholec80]:jaccard (per-video relaxed)": 0.6,
        "classification[cholec80]:f1 (per-video relaxed)": 0.7,
        "multilabel[cvs]:mAP (absent skipped)": 0.64,  # written before the tags: absent labels were left out
    }

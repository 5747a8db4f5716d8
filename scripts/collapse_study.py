"""Collapse diagnostics of short demo runs that learn and runs that collapse: the numbers behind the collapse warning.

Runs ``python -m surgenet_ssl.train`` on the demo data for each named configuration (``--runs``), then reads each
run's ``csv/metrics.csv`` and prints, per run: the diagnostics (teacher entropy and entropy of the mean teacher
distribution as fractions of log K, KL(teacher || student)) at the start and end of training, the per-window trend,
the online k-NN per epoch (step 0 = untrained) and how many warnings the old per-batch rule and the new windowed rule
(:class:`surgenet_ssl.evaluation.diagnostics.CollapseTracker`) would have raised. The LAST line is a JSON summary.

    python scripts/collapse_study.py --runs learning uniform onehot --epochs 6
    python scripts/collapse_study.py --runs locals32 nolocals --out /tmp/study      # small-data drift (item 5)
    python scripts/collapse_study.py --epochs 8 --runs koleo koleo_seed1 koleo_seed2   # the preset (with KoLeo)
    python scripts/collapse_study.py --epochs 8 --runs preset preset_seed1 preset_seed2 preset_lr5e-4   # without it

The out_dim of a run is read from its saved config.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgenet_ssl.evaluation.diagnostics import UNIFORM_RATIO, CollapseTracker  # noqa: E402

COMMON = [
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "monitor.diagnostics_every_n_steps=2",
    "callbacks.knn_monitor.embedding_map=false",
    "export.enabled=false",
    "data.steps_per_epoch=12",
]
# name -> (what it shows, overrides). The demo schedule (schedule/demo.yaml = schedule/small_data.yaml: 64/32-px
# crops, 2 local crops, peak lr 2e-3 at batch 16) is the base. The runs before the small-data preset (learning ...
# locals32_lr: the CollapseTracker's evidence, measured on demo version 1 without camera looks) pin the old demo
# recipe: 112/48-px crops, 4 local crops, the recipe's lr rule 5e-4 x batch / 256.
OLD = [
    "dino.crops.local_number=4",
    "dino.optimizer.base_lr=5e-4",
    "dino.optimizer.reference_batch=256",
    "dino.loss.koleo_weight=0",
]
# The preset_* runs measured the preset before it had KoLeo (README "Small data" table): pinned without it.
NO_KOLEO = ["dino.loss.koleo_weight=0"]
SMALL = [*OLD, "dino.crops.global_size=64", "dino.crops.local_size=32"]
RUNS: dict[str, tuple[str, list[str]]] = {
    "learning": (
        "the demo recipe before the preset (112/48 px, 4 local crops)",
        [*OLD, "dino.crops.global_size=112", "dino.crops.local_size=48"],
    ),
    "nolocals": ("64-px global crops, no local crops", [*SMALL, "dino.crops.local_number=0"]),
    "locals32": ("64-px global + 4 x 32-px local crops", SMALL),
    "uniform": (
        "64/32 px, no sharpening (teacher temp 0.1 = student temp): uniform collapse",
        [*SMALL, "dino.loss.teacher_temp=0.1", "dino.loss.warmup_teacher_temp=0.1"],
    ),
    "onehot": (
        "64/32 px, no centering (center momentum 1.0): one-hot collapse",
        [*SMALL, "dino.loss.center_momentum=1.0"],
    ),
    # the same small-image runs with the lr of batch 256 (5e-4) instead of 5e-4 x 16 / 256
    "nolocals_lr": (
        "as nolocals, peak lr 5e-4",
        [*SMALL, "dino.crops.local_number=0", "dino.optimizer.reference_batch=16"],
    ),
    "locals32_lr": ("as locals32, peak lr 5e-4", [*SMALL, "dino.optimizer.reference_batch=16"]),
    # The small-data preset (README "Small data"), 8 epochs x 12 steps: seeds, lr, teacher temperature and momentum.
    "preset": ("the demo schedule (small-data preset), seed 0", []),
    "preset_seed1": ("the preset, seed 1", ["seed=1"]),
    "preset_seed2": ("the preset, seed 2", ["seed=2"]),
    "preset_lr5e-4": ("the preset at peak lr 5e-4", ["dino.optimizer.base_lr=5e-4"]),
    "preset_lr5e-4_seed1": ("the preset at peak lr 5e-4, seed 1", ["dino.optimizer.base_lr=5e-4", "seed=1"]),
    "preset_lr5e-4_k1024": (
        "the preset at peak lr 5e-4, out_dim 1024",
        ["dino.optimizer.base_lr=5e-4", "dino.out_dim=1024"],
    ),
    "preset_lr5e-4_m0.96": (
        "the preset at peak lr 5e-4, teacher momentum 0.96",
        ["dino.optimizer.base_lr=5e-4", "dino.teacher.momentum=0.96"],
    ),
    "preset_temp0.02": (
        "the preset, teacher temperature 0.02",
        ["dino.loss.teacher_temp=0.02", "dino.loss.warmup_teacher_temp=0.02"],
    ),
    "preset_m0.996_seed1": ("the preset, teacher momentum 0.996, seed 1", ["dino.teacher.momentum=0.996", "seed=1"]),
    "preset_m0.996_seed2": ("the preset, teacher momentum 0.996, seed 2", ["dino.teacher.momentum=0.996", "seed=2"]),
    "preset_warmup2_seed1": ("the preset, 2 warm-up epochs, seed 1", ["dino.optimizer.warmup_epochs=2", "seed=1"]),
}
RUNS = {name: (what, [*NO_KOLEO, *x] if name.startswith("preset") else x) for name, (what, x) in RUNS.items()}
# The preset as it is now (KoLeo 0.3 on the student's pooled features: the demo schedule).
RUNS.update(
    {
        "koleo": ("the preset with KoLeo 0.3 (the demo schedule), seed 0", []),
        "koleo_seed1": ("the preset with KoLeo 0.3, seed 1", ["seed=1"]),
        "koleo_seed2": ("the preset with KoLeo 0.3, seed 2", ["seed=2"]),
    }
)


def run(name: str, out: Path, epochs: int, extra: list[str]) -> Path:
    run_dir = out / name
    if not (run_dir / "csv" / "metrics.csv").is_file():
        cmd = [
            sys.executable,
            "-m",
            "surgenet_ssl.train",
            f"hydra.run.dir={run_dir}",
            f"trainer.max_epochs={epochs}",
            *COMMON,
            *RUNS[name][1],
            *extra,
        ]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "WANDB_MODE": "offline"}, stdout=subprocess.DEVNULL)
    return run_dir / "csv" / "metrics.csv"


def summarise(metrics_csv: Path, out_dim: int) -> dict:
    rows = list(csv.DictReader(open(metrics_csv)))
    log_k = math.log(out_dim)
    diag = [
        (
            int(r["step"]),
            float(r["diag/teacher_entropy"]),
            float(r["diag/teacher_mean_entropy"]),
            float(r["diag/kl_teacher_student"]),
        )
        for r in rows
        if r.get("diag/teacher_entropy")
    ]
    knn = [(int(r["step"]), float(r["knn/top1"])) for r in rows if r.get("knn/top1")]
    loss = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    tracker, new_warnings = CollapseTracker(out_dim), 0
    for _, h, hm, kl in diag:
        new_warnings += (
            tracker.update({"teacher_entropy": h, "teacher_mean_entropy": hm, "kl_teacher_student": kl}) is not None
        )
    old_warnings = sum(h >= UNIFORM_RATIO * log_k for _, h, _, _ in diag)

    def at(i: int) -> dict:
        s, h, hm, kl = diag[i]
        return {"step": s, "H/logK": round(h / log_k, 4), "Hmean/logK": round(hm / log_k, 4), "KL": round(kl, 4)}

    return {
        "first": at(0),
        "last": at(-1),
        "min_H/logK": round(min(d[1] for d in diag) / log_k, 4),
        "knn": knn,
        "loss_first_last": [round(loss[0], 3), round(loss[-1], 3)] if loss else None,
        "old_rule_warnings": old_warnings,
        "new_rule_warnings": new_warnings,
        "diagnostics": len(diag),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=["learning", "uniform", "onehot"], choices=sorted(RUNS))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path("outputs/collapse_study"))
    ap.add_argument("--out-dim", type=int, default=None, help="dino.out_dim of every run (default: each run's own)")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args()
    summary = {}
    for name in args.runs:
        extra = [*args.overrides, *([f"dino.out_dim={args.out_dim}"] if args.out_dim else [])]
        metrics = run(name, args.out, args.epochs, extra)
        out_dim = int(OmegaConf.load(metrics.parents[1] / "config.yaml").dino.out_dim)
        summary[name] = summarise(metrics, out_dim)
        print(f"{name} ({RUNS[name][0]}): {json.dumps(summary[name])}", flush=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

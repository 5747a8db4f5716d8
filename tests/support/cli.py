"""Run the real entry points (``python -m surgenet_ssl.<name>``) in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# A tiny but complete schedule for CaFormer-S18 on the demo data: 2 epochs x 3 steps, small crops and head.
FAST_TRAIN = [
    "data.batch_size=4",
    "data.num_workers=1",
    "data.steps_per_epoch=3",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "dino.out_dim=512",
    "dino.head.hidden_dim=128",
    "dino.head.bottleneck_dim=64",
    "dino.crops.global_size=64",
    "dino.crops.local_size=32",
    "dino.crops.local_number=2",
    "monitor.diagnostics_every_n_steps=2",
]

# A tiny timm backbone for entry-point tests of things other than the backbone (resume, DDP, loaders): seconds per
# run and small checkpoints instead of CaFormer-S18's ~0.5 GB (exports are named demo_test_resnet_epochNNNN_*).
TINY_BACKBONE_ARGS = ["backbone=timm", "backbone.timm_name=test_resnet", "backbone.drop_path_rate=0.0"]


def run_module(
    module: str, *args: str, cache: Path, timeout: int = 600, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "SURGENET_SSL_CACHE": str(cache), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=str(cache.parent),
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{module} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc

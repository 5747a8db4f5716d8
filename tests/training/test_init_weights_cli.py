"""End to end with the real entry point (CaFormer-S18, demo data): trainer.max_steps=0 exports the untrained
teacher; a new run continues pretraining from that published-format .pth (frozen backbone for epoch 1); rerunning
it in its run dir resumes and does not apply init_weights again."""

from __future__ import annotations

import pytest
import torch

from support.cli import FAST_TRAIN, run_module

# Loading in the training process, as the auto default does on a 2-core CPU: CaFormer-S18 then computes on both cores.
ARGS = [*(a for a in FAST_TRAIN if not a.startswith("data.num_workers=")), "data.num_workers=0", "logger=csv"]
ARGS += ["callbacks.knn_monitor.every_n_epochs=0"]


@pytest.mark.slow
def test_export_untrained_then_continue_then_resume(demo_cache, tmp_path):
    untrained = run_module(
        "surgenet_ssl.train", f"hydra.run.dir={tmp_path / 'init'}", *ARGS, "trainer.max_steps=0", cache=demo_cache
    )
    assert untrained.stdout.strip().splitlines()[-1] == f"export_dir={tmp_path / 'init' / 'export'}"
    teacher = tmp_path / "init" / "export" / "demo_caformer_s18_epoch0000_teacher.pth"
    published = torch.load(teacher, weights_only=True)
    assert len(published) == 152  # the published SurgeNet format

    run_dir = tmp_path / "continued"
    first = run_module(
        "surgenet_ssl.train",
        f"hydra.run.dir={run_dir}",
        *ARGS,
        f"backbone.init_weights={teacher}",
        "backbone.freeze_epochs=1",
        cache=demo_cache,
    )
    log = first.stdout + first.stderr
    assert "init_weights: student and teacher start from" in log and "152 backbone tensors" in log
    assert "surgenet naming" in log and "fresh DINO head" in log

    # the same command again (one more epoch): resumes from the run dir, init_weights is not applied
    rerun = run_module(
        "surgenet_ssl.train",
        f"hydra.run.dir={run_dir}",
        *ARGS,
        f"backbone.init_weights={teacher}",
        "backbone.freeze_epochs=1",
        "trainer.max_epochs=3",
        cache=demo_cache,
    )
    log = rerun.stdout + rerun.stderr
    assert "resumed from" in log and "not applied: resuming from" in log and "student and teacher start" not in log

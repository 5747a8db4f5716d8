"""Every callback on 2 gloo ranks with a single-source dataset: a decision one rank takes alone (the k-NN monitor
turning itself off for lack of 2 sources) must not leave the other rank in a barrier (it hung at epoch 1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.cli import FAST_TRAIN, TINY_BACKBONE_ARGS, run_module


@pytest.mark.slow
def test_a_single_source_dataset_trains_on_two_ranks_with_every_callback(demo_cache: Path, tmp_path: Path) -> None:
    from surgenet_ssl.data.demo import ensure_demo_dataset

    one_source = ensure_demo_dataset(demo_cache) / "cholecystectomy"
    run_dir = tmp_path / "run"
    proc = run_module(
        "surgenet_ssl.train",
        f"hydra.run.dir={run_dir}",
        *FAST_TRAIN,
        *TINY_BACKBONE_ARGS,
        "data.num_workers=0",
        "trainer=ddp_cpu",
        "trainer.devices=2",
        "trainer.max_epochs=2",
        "dataset=custom",
        f"dataset.path={one_source}",
        "distributed.timeout_minutes=1",  # a hang fails in a minute instead of 30
        "callbacks.batch_trace.enabled=true",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        cache=demo_cache,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert log.count("k-NN monitor off: no labelled set given and fewer than 2 training sources") == 1  # rank 0
    assert (run_dir / "export").is_dir() and list((run_dir / "export").glob("*_epoch0002_teacher.pth"))

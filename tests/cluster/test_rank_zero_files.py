"""Run-dir files that must exist once per run (wandb id, config) are written by global rank 0 only and survive
requeues (the same wandb run continues after a resume)."""

from __future__ import annotations

import pytest

from surgenet_ssl.runtime.cluster import is_global_rank_zero
from surgenet_ssl.training.trainer import wandb_run_id


@pytest.mark.parametrize(
    ("env", "zero"),
    [
        ({}, True),
        ({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, True),
        ({"SLURM_NTASKS": "4", "SLURM_PROCID": "3"}, False),
        ({"LOCAL_RANK": "1"}, False),
        ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False),
        ({"RANK": "2"}, False),
    ],
)
def test_global_rank_zero_from_the_environment(monkeypatch, env, zero):
    for var in ("SLURM_NTASKS", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK"):
        monkeypatch.delenv(var, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert is_global_rank_zero() is zero


def test_wandb_run_id_is_written_by_rank_zero_and_reused_after_requeue(tmp_path, monkeypatch):
    for var in ("SLURM_NTASKS", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    wandb_run_id(tmp_path)  # a non-zero rank starting first writes nothing
    assert not (tmp_path / "wandb_run_id.txt").exists()
    monkeypatch.setenv("SLURM_PROCID", "0")
    first = wandb_run_id(tmp_path)
    assert (tmp_path / "wandb_run_id.txt").read_text() == first
    assert wandb_run_id(tmp_path) == first  # the requeued job continues the same wandb run

"""Defaults that fit the machine: loader workers and torch threads from the usable cores, a CPU device count
beyond the cores refused at start, and a console free of Lightning's benign warnings."""

from __future__ import annotations

import logging
import re
import warnings

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, IterableDataset

from support.cli import run_module
from support.tiny_training import TINY_BACKBONE, crop_batches, tiny_dino
from surgenet_ssl.config.dirs import CONFIG_DIR
from surgenet_ssl.runtime import resources
from surgenet_ssl.training import trainer as trainer_mod
from surgenet_ssl.training.module import DINOModule


@pytest.fixture()
def machine(monkeypatch):
    """``machine(cores, gpus=0)``: pretend this process may use ``cores`` CPU cores and sees ``gpus`` GPUs."""

    def set_machine(cores: int, gpus: int = 0) -> None:
        monkeypatch.setattr(resources, "usable_cpus", lambda: cores)
        monkeypatch.setattr(trainer_mod, "usable_cpus", lambda: cores)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)

    monkeypatch.delenv("SLURM_CPUS_ON_NODE", raising=False)
    return set_machine


def _trainer(**kw) -> dict:
    return {"accelerator": "auto", "devices": "auto", "strategy": "auto"} | kw


@pytest.mark.parametrize(
    "cores, gpus, trainer, cap, expected",
    [
        (2, 0, _trainer(), None, 0),  # the 2-core box training on its CPU: load between steps, compute on both
        (2, 0, None, None, 1),  # 2 cores, trainer unknown: 1 worker, not 8
        (2, 1, _trainer(), None, 1),  # 2 cores feeding a GPU: the worker overlaps with the GPU's step
        (4, 0, _trainer(accelerator="cpu"), None, 3),  # more cores: workers
        (1, 0, _trainer(), None, 0),  # one core: load in the training process
        (32, 0, _trainer(), None, 8),  # at most 8
        (64, 0, _trainer(), "2", 2),  # ${surgenet.auto_workers:2}
        (4, 0, _trainer(accelerator="cpu", devices=2), None, 0),  # 2 CPU processes share 4 cores: 2 each, compute
        (16, 4, _trainer(), None, 3),  # all 4 GPUs of a 16-core node: 4 cores each
        (16, 4, _trainer(accelerator="gpu", devices=[0, 1]), None, 7),  # 2 of them
        (16, 0, None, None, 8),  # no trainer config known: one process
    ],
)
def test_auto_workers(machine, cores, gpus, trainer, cap, expected):
    machine(cores, gpus)
    root = OmegaConf.create({"trainer": trainer} if trainer is not None else {})
    assert resources.auto_workers(cap, _root_=root) == expected


def test_slurm_task_bound_to_its_own_cores_does_not_share_them(machine, monkeypatch):
    machine(16, 4)
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "64")  # 4 tasks x 16 CPUs; this one sees its 16
    assert resources.local_training_processes(_trainer(accelerator="gpu", devices=-1)) == 1
    assert resources.auto_workers(_root_=OmegaConf.create({"trainer": _trainer(accelerator="gpu", devices=-1)})) == 8


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_configs_default_to_the_machine(machine):
    machine(2)
    assert _compose("dataset=cholec").data.num_workers == 0  # CPU training on 2 cores: load between steps
    assert _compose("dataset=cholec").data.torch_threads is None
    assert _compose().data.num_workers == 0
    machine(2, gpus=1)
    assert _compose("dataset=cholec").data.num_workers == 1
    assert _compose().data.num_workers == 1  # the demo: at most 2
    assert _compose("dataset=cholec", "data.num_workers=5").data.num_workers == 5
    machine(32)
    assert _compose("dataset=cholec").data.num_workers == 8
    assert _compose().data.num_workers == 2
    assert _compose("dataset=cholec", "trainer=cpu", "trainer.devices=4").data.num_workers == 7


@pytest.mark.parametrize(
    "cores, workers, processes, expected", [(2, 1, 1, 1), (2, 2, 1, 1), (2, 0, 1, 2), (16, 3, 4, 1), (16, 3, 1, 13)]
)
def test_auto_torch_threads(machine, cores, workers, processes, expected):
    machine(cores, gpus=processes if processes > 1 else 0)
    assert resources.auto_torch_threads(workers, _trainer(devices=processes)) == expected


def test_apply_torch_threads_sets_and_logs_once(machine, caplog):
    machine(2)
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="surgenet_ssl.runtime.resources"):
            assert resources.apply_torch_threads(None, 1, _trainer()) == 1
            assert torch.get_num_threads() == 1
            assert resources.apply_torch_threads(3, 1, _trainer(), announce=False) == 3
            assert torch.get_num_threads() == 3
        budget = [r.getMessage() for r in caplog.records if "CPU budget" in r.getMessage()]
        assert budget == [
            "CPU budget: 2 usable cores, 1 training process(es) on this node, 1 loader worker(s) and 1 "
            "torch thread(s) per process (auto; data.num_workers / data.torch_threads override)"
        ]
        with pytest.raises(ValueError, match="data.torch_threads must be >= 1"):
            resources.apply_torch_threads(0, 1, _trainer())
    finally:
        torch.set_num_threads(before)


def test_more_cpu_devices_than_cores_fails_with_the_fix(machine):
    machine(2)
    for trainer in (_trainer(accelerator="cpu", devices=3), _trainer(devices="4")):
        with pytest.raises(
            ValueError,
            match=r"only 2 CPU core\(s\) are usable here. Use trainer.devices=2 .*"
            r"trainer.strategy=ddp",
        ):
            trainer_mod.check_devices(OmegaConf.create(trainer))
    trainer_mod.check_devices(OmegaConf.create(_trainer(accelerator="cpu", devices=3, strategy="ddp")))  # on purpose
    trainer_mod.check_devices(OmegaConf.create(_trainer(accelerator="cpu", devices=2)))
    trainer_mod.check_devices(OmegaConf.create(_trainer(accelerator="cpu", devices="auto")))
    machine(2, gpus=4)
    trainer_mod.check_devices(OmegaConf.create(_trainer(devices=3)))  # auto picks the GPUs: not a CPU request


def test_cli_cpu_devices_beyond_cores_fails_at_once(demo_cache, tmp_path):
    wanted = resources.usable_cpus() + 1
    proc = run_module(
        "surgenet_ssl.train",
        "trainer=cpu",
        f"trainer.devices={wanted}",
        f"hydra.run.dir={tmp_path}",
        cache=demo_cache,
        check=False,
    )
    assert proc.returncode == 1
    assert f"trainer.devices={wanted} asks for {wanted} CPU training processes" in proc.stderr + proc.stdout
    assert not (tmp_path / "checkpoints").exists()


class _Batches(IterableDataset):
    """An IterableDataset with a length, like MixtureStream."""

    def __init__(self, n: int) -> None:
        self.batches = list(crop_batches(n, batch_size=2))

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _DataModule(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(_Batches(2), batch_size=None)


def _fit_and_record(silenced: bool) -> list[str]:
    """Messages of the warnings a tiny fit emits (Lightning's de-duplication caches cleared first)."""
    from pytorch_lightning.trainer.connectors import data_connector

    data_connector.warning_cache.clear()
    torch.manual_seed(0)
    module = DINOModule(TINY_BACKBONE, tiny_dino(), batch_size=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if silenced:
            trainer_mod.silence_benign_warnings()
        trainer.fit(module, datamodule=_DataModule())
    return [str(w.message) for w in caught]


def test_benign_lightning_warnings_are_silenced(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    benign = [re.compile(p) for p in trainer_mod.BENIGN_WARNINGS]
    loud = _fit_and_record(silenced=False)
    # the patterns still match what this Lightning version says (else the filters would silently go stale)
    assert any(benign[0].match(m) for m in loud) and any(benign[1].match(m) for m in loud), loud
    quiet = _fit_and_record(silenced=True)
    assert not [m for m in quiet if any(p.match(m) for p in benign)], quiet


def test_wandb_logger_does_not_trigger_the_anonymous_deprecation_warning(tmp_path, capfd, monkeypatch):
    from surgenet_ssl.training.loggers import WandbLogger

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train")
    assert cfg.logger.wandb._target_ == "surgenet_ssl.training.loggers.WandbLogger"
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(project="t", save_dir=str(tmp_path), offline=True)
    assert "anonymous" not in logger._wandb_init
    try:
        logger.experiment  # noqa: B018 - wandb.init (offline: no network, no account)
    finally:
        import wandb

        wandb.finish()
    out, err = capfd.readouterr()
    assert "anonymous setting" not in out + err


def test_a_task_bound_to_fewer_cores_than_its_workers_is_told_the_fix(monkeypatch, caplog):
    """srun without --cpus-per-task (SLURM >= 22.05): each task is bound to one core while 15 workers start."""
    monkeypatch.setattr(resources, "usable_cpus", lambda: 1)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    with caplog.at_level(logging.WARNING, logger="surgenet_ssl.runtime.resources"):
        message = resources.check_worker_cores(15)
    assert message is not None and "srun --cpus-per-task=$SLURM_CPUS_PER_TASK" in caplog.text
    assert "1 CPU core(s)" in message and "data.num_workers=15" in message
    monkeypatch.setattr(resources, "usable_cpus", lambda: 16)
    assert resources.check_worker_cores(15) is None  # 15 workers + the training process on 16 cores
    assert resources.check_worker_cores(0) is None


def test_sbatch_templates_pass_the_cores_to_srun():
    from pathlib import Path

    slurm = Path(__file__).resolve().parents[2] / "slurm"
    for template in ("single_node.sbatch", "multi_node.sbatch"):
        steps = [line for line in (slurm / template).read_text().splitlines() if line.startswith("srun ")]
        assert steps and all('--cpus-per-task="${SLURM_CPUS_PER_TASK}"' in line for line in steps), template

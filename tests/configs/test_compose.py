"""Every config preset composes (a dry `--cfg job` per preset), and ablation grids expand to the right runs."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import surgenet_ssl.train  # noqa: F401  (registers the config resolvers)
from surgenet_ssl.config.dirs import CONFIG_DIR

CONFIGS = str(CONFIG_DIR)
EXPERIMENTS = {
    "dataset_scaling": ("dataset", ["small", "public", "surgenet", "surgenetxl"]),
    "dataset_fraction": ("dataset.fraction", ["0.1", "0.25", "0.5", "1.0"]),
    "procedure_specific": ("dataset", ["cholec", "ramie", "rarp"]),
    "training_length": ("trainer.max_epochs", ["25", "50"]),
    "architecture": ("backbone", ["caformer_s18", "convnextv2_tiny", "pvt_v2_b2"]),
}


def _compose(overrides: list[str], hydra_cfg: bool = False):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=hydra_cfg)


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_every_ablation_preset_composes_and_expands(experiment):
    key, values = EXPERIMENTS[experiment]
    cfg = _compose([f"experiment={experiment}"], hydra_cfg=True)
    assert str(cfg.hydra.sweeper.params[key]).split(",") == values
    for value in values:  # each job of the grid composes into a full, resolvable config
        job = _compose([f"experiment={experiment}", f"{key}={value}"])
        resolved = OmegaConf.to_container(job.dino, resolve=True)
        assert resolved["out_dim"] == 65536  # the full recipe, not the demo schedule
        assert str(OmegaConf.select(job, key)) == value or OmegaConf.select(job, f"{key}.name") == value


@pytest.mark.parametrize("trainer", ["default", "cpu", "gpu", "multinode", "ddp_cpu"])
def test_trainer_presets(trainer):
    cfg = _compose([f"trainer={trainer}", "dataset=surgenetxl"])
    t = cfg.trainer
    assert t._target_ == "pytorch_lightning.Trainer" and t.use_distributed_sampler is False
    if trainer in ("gpu", "multinode"):
        assert t.precision == "bf16-mixed" and t.strategy == "ddp" and t.sync_batchnorm is True
    if trainer == "multinode":
        assert t.num_nodes == 2
    if trainer in ("cpu", "ddp_cpu"):
        assert t.accelerator == "cpu" and t.precision == "32-true"


def test_submitit_slurm_launcher_defaults():
    cfg = _compose(["hydra/launcher=submitit_slurm"], hydra_cfg=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 4 and launcher.tasks_per_node == 4 and launcher.timeout_min == 2880
    assert launcher.max_num_timeout > 0


@pytest.mark.parametrize("backbone", ["caformer_s18", "convnextv2_tiny", "pvt_v2_b2", "vit_small"])
@pytest.mark.parametrize("dataset", ["demo", "cholec", "ramie", "rarp", "public", "surgenet", "small", "surgenetxl"])
def test_backbone_and_dataset_groups_compose(backbone, dataset):
    cfg = _compose([f"backbone={backbone}", f"dataset={dataset}"])
    assert cfg.backbone.name == backbone and cfg.dataset.name == dataset
    assert cfg.run_name == f"{dataset}_{backbone}"


def test_ddp_strategy_gets_the_configured_timeout():
    from pytorch_lightning.strategies import DDPStrategy

    from surgenet_ssl.training.trainer import build_strategy

    cfg = _compose(["trainer=cpu", "trainer.devices=2", "trainer.strategy=ddp", "distributed.timeout_minutes=7"])
    strategy = build_strategy(cfg)
    assert isinstance(strategy, DDPStrategy)
    assert strategy._timeout.total_seconds() == 7 * 60
    assert build_strategy(_compose(["trainer=cpu"])) == "auto"


def test_wandb_is_offline_unless_configured(monkeypatch):
    from surgenet_ssl.training.trainer import wandb_offline

    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_offline(_compose([]).logger.wandb) is True
    assert wandb_offline(_compose(["logger.wandb.entity=my-lab"]).logger.wandb) is False
    assert wandb_offline(_compose(["logger.wandb.entity=my-lab", "logger.wandb.offline=true"]).logger.wandb) is True
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_offline(_compose([]).logger.wandb) is False


def test_sweep_job_dirs_name_the_swept_keys():
    cfg = _compose(["experiment=architecture", "backbone=pvt_v2_b2", "trainer.max_epochs=2"], hydra_cfg=True)
    cfg.hydra.job.num = 2
    assert cfg.hydra.sweep.subdir == "2_backbone=pvt_v2_b2"  # only what the grid varies
    cfg = _compose(["data.batch_size=8", "seed=3"], hydra_cfg=True)  # a command-line grid: all overrides
    cfg.hydra.job.num = 0
    assert cfg.hydra.sweep.subdir == "0_data.batch_size=8,seed=3"


def test_checkpoint_callbacks_coexist_with_any_intervals(tmp_path):
    """Epoch, step and archive checkpointers with equal intervals must not collide in the Trainer's state."""
    import pytorch_lightning as pl

    from surgenet_ssl.training.pretrain import build_callbacks

    cfg = _compose(
        [
            "callbacks.archive_checkpoint.every_n_epochs=1",
            "callbacks.model_checkpoint.every_n_train_steps=1",
            f"callbacks.model_checkpoint.dirpath={tmp_path}",
            f"callbacks.archive_checkpoint.dirpath={tmp_path}/a",
            f"callbacks.knn_monitor.output_dir={tmp_path}",
            f"callbacks.batch_trace.output_dir={tmp_path}",
            "export.enabled=false",
        ]
    )
    callbacks = build_callbacks(cfg, tmp_path)
    checkpointers = [c for c in callbacks if isinstance(c, pl.callbacks.ModelCheckpoint)]
    assert len(checkpointers) == 3 and len({c.state_key for c in checkpointers}) == 3
    pl.Trainer(callbacks=callbacks, logger=False, default_root_dir=tmp_path)  # would raise on duplicate state keys


def test_sweep_job_dir_is_one_short_path_component():
    from surgenet_ssl.config.resolvers import sweep_subdir

    assert (
        sweep_subdir(1, ["dataset.path=/data/x", "seed=1"], None, "dataset.path=/data/x,seed=1")
        == "1_dataset.path=%data%x,seed=1"
    )
    long = ",".join(f"key{i}=value{i}" for i in range(40))
    name = sweep_subdir(0, [], None, long)
    assert len(name) < 160 and "/" not in name and name != sweep_subdir(0, [], None, long + ",x=1")


def test_every_trainer_argument_is_declared_so_it_overrides_without_plus():
    import inspect

    import pytorch_lightning as pl

    declared = set(_compose([]).trainer) - {"_target_"}
    accepted = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self", "callbacks", "logger"}
    assert accepted <= declared, f"not declared in configs/trainer/default.yaml: {sorted(accepted - declared)}"
    cfg = _compose(
        [
            "trainer.max_steps=7",
            "trainer.limit_train_batches=3",
            "trainer.val_check_interval=0.5",
            "trainer.profiler=simple",
            "trainer=cpu",
            "trainer.max_time=00:01:00:00",
        ]
    )
    assert cfg.trainer.max_steps == 7 and cfg.trainer.limit_train_batches == 3 and cfg.trainer.profiler == "simple"


def test_misspelt_trainer_argument_names_the_closest_valid_one():
    from surgenet_ssl.training.trainer import trainer_kwargs

    out = "paths.output_dir=run"
    cfg = _compose(["+trainer.max_stpes=5", out])
    with pytest.raises(
        ValueError, match=r"trainer.max_stpes is not a pytorch_lightning.Trainer argument.*trainer.max_steps"
    ):
        trainer_kwargs(cfg.trainer)
    with pytest.raises(ValueError, match="built from the `logger` config group"):
        trainer_kwargs(_compose(["+trainer.logger=false", out]).trainer)
    kwargs = trainer_kwargs(_compose(["trainer.max_steps=5", out]).trainer)
    assert kwargs["max_steps"] == 5 and "_target_" not in kwargs

"""Users' own configs outside the package: a folder of their own group options (a dataset mixture, a backbone, an
experiment grid) named by SURGENET_SSL_CONFIG_DIR or passed with --config-dir, composed from another directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from surgenet_ssl.config.dirs import CONFIG_DIR, ENV_VAR, UserConfigDirError, user_config_dirs

MY_MIX = """\
name: my_mix
sources:
  cholec80: 1.0
  my_hospital: 2.0
fraction: 1.0
allow_missing: false
root: ${paths.data_root}
path: null
generate: null
"""
# starts from the shipped backbone/timm.yaml: the user's folder and the package's are one search path
MY_BACKBONE = """\
defaults:
  - timm
  - _self_
name: my_backbone
timm_name: resnet18
"""
MY_GRID = """\
# @package _global_
seed: 7
hydra:
  sweeper:
    params:
      dataset.fraction: 0.5,1.0
"""


def user_folder(root: Path) -> Path:
    for rel, text in {
        "dataset/my_mix.yaml": MY_MIX,
        "backbone/my_backbone.yaml": MY_BACKBONE,
        "experiment/my_grid.yaml": MY_GRID,
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def cli(entry: str, *args: str, cwd: Path, config_dir: str | None) -> subprocess.CompletedProcess:
    """``python -m surgenet_ssl.<entry>`` run from ``cwd``, with SURGENET_SSL_CONFIG_DIR set or unset."""
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    if config_dir is not None:
        env[ENV_VAR] = config_dir
    return subprocess.run(
        [sys.executable, "-m", f"surgenet_ssl.{entry}", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    """(the user's config folder, an empty working directory elsewhere)."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    return user_folder(tmp_path / "my_configs"), work


def printed(yaml_text: str) -> dict:
    """A config printed by ``--cfg``, as a dict (interpolations left as they are)."""
    return OmegaConf.to_container(OmegaConf.create(yaml_text), resolve=False)  # type: ignore[return-value]


def check_composed(job_yaml: str) -> None:
    cfg = printed(job_yaml)
    assert cfg["dataset"]["name"] == "my_mix"
    assert cfg["dataset"]["sources"] == {"cholec80": 1.0, "my_hospital": 2.0}
    assert cfg["backbone"]["name"] == "my_backbone" and cfg["backbone"]["timm_name"] == "resnet18"
    assert cfg["backbone"]["drop_path_rate"] == 0.1  # from the shipped backbone/timm.yaml it starts from
    assert cfg["seed"] == 7  # from the experiment


def test_env_var_folder_adds_a_dataset_a_backbone_and_an_experiment_grid(folders):
    mine, work = folders
    choice = ["dataset=my_mix", "backbone=my_backbone", "experiment=my_grid"]
    job = cli("train", *choice, "--cfg", "job", cwd=work, config_dir=str(mine))
    assert job.returncode == 0, job.stderr
    check_composed(job.stdout)
    grid = cli("train", *choice, "--cfg", "hydra", cwd=work, config_dir=str(mine))
    assert grid.returncode == 0, grid.stderr
    assert printed(grid.stdout)["hydra"]["sweeper"]["params"] == {"dataset.fraction": "0.5,1.0"}
    # without the folder, the same command names the missing option and lists the shipped ones
    missing = cli("train", *choice, "--cfg", "job", cwd=work, config_dir=None)
    assert missing.returncode != 0 and "Could not find 'experiment/my_grid'" in missing.stderr


def test_config_dir_flag_works_as_well(folders):
    mine, work = folders
    job = cli(
        "train", "--config-dir", str(mine), "dataset=my_mix", "backbone=my_backbone", "experiment=my_grid", "--cfg",
        "job", cwd=work, config_dir=None,
    )  # fmt: skip
    assert job.returncode == 0, job.stderr
    check_composed(job.stdout)


def test_several_folders_and_the_other_entry_points(folders, tmp_path):
    mine, work = folders
    second = tmp_path / "team_configs"
    (second / "backbone").mkdir(parents=True)
    (mine / "backbone" / "my_backbone.yaml").rename(second / "backbone" / "my_backbone.yaml")
    both = f"{mine}{os.pathsep}{second}"
    job = cli("train", "dataset=my_mix", "backbone=my_backbone", "experiment=my_grid", "--cfg", "job", cwd=work,
              config_dir=both)  # fmt: skip
    assert job.returncode == 0, job.stderr
    check_composed(job.stdout)
    for entry in ("finetune", "evaluate"):  # the backbone group is shared with training
        out = cli(entry, "backbone=my_backbone", "weights=null", "--cfg", "job", cwd=work, config_dir=both)
        assert out.returncode == 0, out.stderr
        assert printed(out.stdout)["backbone"]["timm_name"] == "resnet18"


def test_info_shows_where_a_group_option_comes_from(folders):
    """``--info searchpath`` lists the folders in search order, ``--info defaults`` the option's config path: the
    first folder holding ``dataset/my_mix.yaml`` provides it."""
    mine, work = folders
    searchpath = cli("train", "dataset=my_mix", "--info", "searchpath", cwd=work, config_dir=str(mine))
    assert searchpath.returncode == 0, searchpath.stderr
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in searchpath.stdout.splitlines() if "://" in line]
    paths = [path for _, path in rows]
    assert paths.index(f"file://{CONFIG_DIR}") < paths.index(f"file://{mine.resolve()}")
    defaults = cli("train", "dataset=my_mix", "backbone=my_backbone", "--info", "defaults", cwd=work,
                   config_dir=str(mine))  # fmt: skip
    assert defaults.returncode == 0, defaults.stderr
    listed = {line.strip("|").split("|")[0].strip() for line in defaults.stdout.splitlines() if line.startswith("|")}
    assert {"dataset/my_mix", "backbone/my_backbone", "backbone/timm"} <= listed
    assert (mine / "dataset" / "my_mix.yaml").is_file() and not (CONFIG_DIR / "dataset" / "my_mix.yaml").exists()


def test_a_missing_folder_is_a_clear_error(folders, tmp_path):
    _, work = folders
    out = cli("train", "--cfg", "job", cwd=work, config_dir=str(tmp_path / "nope"))
    assert out.returncode == 1
    assert f"{ENV_VAR}: '{tmp_path / 'nope'}' is not a directory" in out.stderr


def test_a_file_named_like_a_shipped_option_is_refused_not_ignored(tmp_path):
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "demo.yaml").write_text(MY_MIX)
    with pytest.raises(UserConfigDirError, match=r"dataset/demo\.yaml.*Rename yours"):
        user_config_dirs(str(tmp_path))


def test_env_var_parsing(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    assert user_config_dirs("") == []
    assert user_config_dirs(f"{a}{os.pathsep}{os.pathsep}{b}{os.pathsep}") == [a.resolve(), b.resolve()]
    monkeypatch.setenv(ENV_VAR, str(b))
    assert user_config_dirs() == [b.resolve()]


def test_compose_api_sees_the_folder_too(folders, monkeypatch):
    """Code composing the configs itself (notebooks, tests) gets the same search path as the entry points."""
    mine, _ = folders
    monkeypatch.setenv(ENV_VAR, str(mine))
    import surgenet_ssl.config.resolvers  # noqa: F401 - registers the config resolvers

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["dataset=my_mix", "backbone=my_backbone", "experiment=my_grid"])
    assert cfg.dataset.name == "my_mix" and cfg.backbone.timm_name == "resnet18" and cfg.seed == 7

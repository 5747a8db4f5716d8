"""The installed package, not the checkout: a wheel built from the sources, installed into a fresh virtual
environment, answers every entry point (``python -m`` and console script) and trains 2 demo steps with export from
an empty directory. The venv sees the system's site-packages (torch & co.), but surgenet_ssl comes from the wheel.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.cli import FAST_TRAIN, TINY_BACKBONE_ARGS

REPO = Path(__file__).resolve().parents[1]
VERSION = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)  # [project]
HYDRA_ENTRY_POINTS = ["train", "prepare", "evaluate", "finetune", "curate"]  # `--cfg job` composes their configs
PLAIN_ENTRY_POINTS = ["export", "report", "datasets"]  # a plain command line: `--help`


def test_each_entry_point_has_its_console_script():
    """pyproject's [project.scripts]: ``surgenet-ssl-<name> = surgenet_ssl.<name>:main`` for every entry point (a fast
    check of the table; the slow tests below run the installed scripts)."""
    table = (REPO / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    scripts = dict(re.findall(r'^(surgenet-ssl-\S+) = "(.+)"$', table, re.M))
    assert scripts == {f"surgenet-ssl-{n}": f"surgenet_ssl.{n}:main" for n in HYDRA_ENTRY_POINTS + PLAIN_ENTRY_POINTS}
    runnable = {
        ".".join(p.relative_to(REPO).with_suffix("").parts) + ":main"
        for p in (REPO / "surgenet_ssl").rglob("*.py")
        if 'if __name__ == "__main__"' in p.read_text()
    }
    assert runnable == set(scripts.values())  # a new entry point needs its console script too


class Venv:
    """A virtual environment with the wheel installed; commands run from an empty directory outside the checkout."""

    def __init__(self, root: Path, work: Path, cache: Path):
        self.root, self.work = root, work
        self.bin = root / ("Scripts" if os.name == "nt" else "bin")
        self.python = self.bin / "python"
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SURGENET_SSL_CONFIG_DIR")}
        self.env.update(
            PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
            VIRTUAL_ENV=str(root),
            SURGENET_SSL_CACHE=str(cache),
            WANDB_MODE="offline",
            WANDB_SILENT="true",
        )

    def run(self, *argv: str | Path, timeout: int = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(a) for a in argv], cwd=self.work, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise AssertionError(f"{argv} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return proc

    def files(self) -> set[Path]:
        """Every file of the venv apart from bytecode caches (which Python writes on import)."""
        return {p for p in self.root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def venv(tmp_path_factory, demo_cache) -> Venv:
    tmp = tmp_path_factory.mktemp("installed")
    # Build from a copy of what the wheel is made of: no build/ or egg-info left in the checkout, none read from it.
    src = tmp / "src"
    shutil.copytree(REPO / "surgenet_ssl", src / "surgenet_ssl", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    dist = tmp / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("surgenet_ssl-*.whl")
    root = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(root)], check=True)
    work = tmp / "empty"
    work.mkdir()
    env = Venv(root, work, demo_cache)
    # the system's pip, run by the venv's python, installs into the venv (no network: --no-index, --no-deps)
    env.run(env.python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel)
    return env


@pytest.mark.slow
def test_the_wheel_not_the_checkout_is_imported(venv):
    code = (
        "import sys, surgenet_ssl; from surgenet_ssl.config.dirs import CONFIG_DIR; "
        "print(surgenet_ssl.__file__); print(CONFIG_DIR); print(surgenet_ssl.__version__); print(sys.path)"
    )
    module_file, config_dir, version, path = venv.run(venv.python, "-c", code).stdout.splitlines()
    assert Path(module_file).is_relative_to(venv.root), module_file  # shadows any editable install of a checkout
    assert Path(config_dir).is_relative_to(venv.root) and (Path(config_dir) / "train.yaml").is_file()
    assert len(list(Path(config_dir).rglob("*.yaml"))) == len(list((REPO / "surgenet_ssl/configs").rglob("*.yaml")))
    assert version == VERSION
    assert str(REPO) not in path


@pytest.mark.slow
@pytest.mark.parametrize("name", HYDRA_ENTRY_POINTS + PLAIN_ENTRY_POINTS)
def test_every_entry_point_answers_as_module_and_console_script(venv, name):
    args = ["--cfg", "job"] if name in HYDRA_ENTRY_POINTS else ["--help"]
    as_module = venv.run(venv.python, "-m", f"surgenet_ssl.{name}", *args).stdout
    as_script = venv.run(venv.bin / f"surgenet-ssl-{name}", *args).stdout
    assert as_module == as_script and as_module.strip()
    if name in HYDRA_ENTRY_POINTS:
        assert "\nhydra:" not in as_module and ":" in as_module.splitlines()[0]  # the composed job config
    else:
        assert f"python -m surgenet_ssl.{name}" in as_module  # its usage


@pytest.mark.slow
def test_datasets_reads_the_packaged_prepare_config(venv):
    out = venv.run(venv.bin / "surgenet-ssl-datasets", "mixture=small").stdout
    assert f"paths.data_root = {Path('data')}" in out  # ./data of the working directory (configs/paths)
    assert "small:" in out


@pytest.mark.slow
def test_two_step_demo_training_and_export_from_an_empty_directory(venv):
    before = venv.files()
    train = venv.run(
        venv.bin / "surgenet-ssl-train",
        *FAST_TRAIN,
        *TINY_BACKBONE_ARGS,
        "data.steps_per_epoch=2",
        "trainer.max_epochs=1",
        "logger=csv",
        "callbacks.knn_monitor.every_n_epochs=0",
        timeout=600,
    )
    export_dir = Path(train.stdout.strip().splitlines()[-1].removeprefix("export_dir="))
    assert export_dir.is_relative_to(venv.work / "outputs"), export_dir  # run dirs: the working directory
    card = (export_dir / "README.md").read_text()
    assert f"surgenet-ssl {VERSION}" in card and "\nsurgenet-ssl-train " in card  # the version and the command
    ckpt = export_dir.parent / "checkpoints" / "last.ckpt"
    again = venv.run(venv.bin / "surgenet-ssl-export", f"ckpt={ckpt}", f"output={venv.work / 'again'}")
    assert again.stdout.strip().splitlines()[-1] == f"export_dir={venv.work / 'again'}"
    assert (venv.work / "again" / "demo_test_resnet_epoch0001_teacher.pth").is_file()
    assert venv.files() == before  # nothing written into the install location

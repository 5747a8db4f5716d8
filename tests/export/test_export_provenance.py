"""Exports are reproducible (same checkpoint -> same bytes) and the model card says how the weights were made:
command, overrides, git commit of the code and the final online k-NN."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import surgenet_ssl
from evaluation.helpers import make_image_folder
from support.tiny_training import crop_batches, tiny_dino
from surgenet_ssl import export as export_mod
from surgenet_ssl.callbacks import TeacherExport
from surgenet_ssl.callbacks.knn_monitor import KNNMonitor
from surgenet_ssl.config.dirs import CONFIG_DIR
from surgenet_ssl.training import provenance, teacher_export
from surgenet_ssl.training.module import DINOModule

REPO = Path(__file__).resolve().parents[2]
PROVENANCE = {
    "command": "python -m surgenet_ssl.train dataset=cholec 'data.train=a b'",
    "overrides": ["dataset=cholec", "data.train=a b"],
    "git_commit": "0123abcd",
    "version": "9.9",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """A 1-epoch tiny run with the online k-NN monitor (image folders) and the end-of-training export."""
    root = tmp_path_factory.mktemp("run")
    make_image_folder(root / "knn_train", 4)
    make_image_folder(root / "knn_val", 2, seed=1)
    torch.manual_seed(0)
    model = DINOModule({"name": "timm", "timm_name": "test_resnet", "drop_path_rate": 0.0}, tiny_dino(), batch_size=2)
    run_config = {"dataset": {"name": "demo"}, "backbone": {"name": "timm", "timm_name": "test_resnet"}}
    knn = KNNMonitor(
        every_n_epochs=1,
        k=3,
        image_size=32,
        train_dir=str(root / "knn_train"),
        val_dir=str(root / "knn_val"),
        embedding_map=False,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[knn, TeacherExport(root / "export", "demo", run_config, provenance=PROVENANCE)],
    )
    trainer.fit(model, train_dataloaders=crop_batches(2, batch_size=2))
    assert knn.last_result
    ckpt = root / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt, root / "export"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_reexporting_the_same_checkpoint_gives_identical_bytes(run, tmp_path):
    ckpt, _ = run
    outputs = [tmp_path / f"export{i}" for i in range(4)]
    for out in outputs:
        assert export_mod.main([f"ckpt={ckpt}", f"output={out}"]) == 0
    first = _files(outputs[0])
    assert {n.rsplit("_", 1)[-1] for n in first} == {
        "teacher.pth",
        "teacher.safetensors",
        "checkpoint.pth",
        "README.md",
    }
    for out in outputs[1:]:
        again = _files(out)
        assert again.keys() == first.keys()
        assert [n for n in first if again[n] != first[n]] == []


def test_safetensors_metadata_is_sorted_and_file_loads(tmp_path):
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(3, dtype=torch.float16)}
    meta = {"naming": "timm", "epoch": "3", "backbone": "x", "zeta": "ü"}
    path = tmp_path / "w.safetensors"
    teacher_export.save_safetensors(tensors, path, meta)
    size = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + size])
    assert list(header["__metadata__"]) == sorted(meta)
    loaded = load_file(path)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == meta


def test_model_card_records_command_overrides_commit_and_final_knn(run, tmp_path):
    ckpt, auto = run
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    knn = teacher_export.final_knn(checkpoint)
    assert knn is not None and 0.0 <= knn["knn/top1"] <= 1.0 and knn["epoch"] == 1
    assert export_mod.main([f"ckpt={ckpt}", f"output={tmp_path}"]) == 0
    for card in (auto / "README.md", tmp_path / "README.md"):  # at the end of training and from the CLI
        text = card.read_text()
        assert f"```bash\n{PROVENANCE['command']}\n```" in text
        assert "- overrides: `dataset=cholec`, `data.train=a b`" in text
        assert "git commit 0123abcd" in text and "surgenet-ssl 9.9" in text
        assert f"final online k-NN: top-1 {knn['knn/top1']:.4f}, top-5 {knn['knn/top5']:.4f} (epoch 1" in text
    assert shlex.split(PROVENANCE["command"])[-1] == "data.train=a b"  # copy-pasteable: quoting kept


def test_card_of_an_old_checkpoint_says_unknown(run, tmp_path):
    ckpt, _ = run
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    checkpoint.pop("run_provenance")
    checkpoint.pop("callbacks", None)
    teacher_export.export_checkpoint(checkpoint, tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "# unknown" in text and "overrides: unknown" in text and "git commit unknown" in text
    assert "final online k-NN: not measured" in text


def test_run_provenance_from_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(REPO / "surgenet_ssl" / "train.py"), "dataset=cholec", "seed=1 2"])
    prov = provenance.run_provenance()
    assert prov["command"] == "python -m surgenet_ssl.train dataset=cholec 'seed=1 2'"
    assert prov["git_commit"] == provenance.git_commit()


def test_run_provenance_of_a_console_script_and_the_package_version(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/opt/venv/bin/surgenet-ssl-train", "dataset=cholec"])
    prov = provenance.run_provenance()
    assert prov["command"] == "surgenet-ssl-train dataset=cholec"
    assert prov["version"] == surgenet_ssl.__version__ != ""


def test_run_provenance_under_hydra_lists_task_overrides(monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setattr(sys, "argv", [str(REPO / "surgenet_ssl" / "train.py"), "dataset=cholec", "seed=3"])
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["dataset=cholec", "seed=3"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        prov = provenance.run_provenance()
    finally:
        HydraConfig.instance().cfg = None
    assert prov["overrides"] == ["dataset=cholec", "seed=3"]
    assert prov["command"] == "python -m surgenet_ssl.train dataset=cholec seed=3"


def test_git_commit_of_this_checkout_or_unknown(tmp_path, monkeypatch):
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0 and (REPO / ".git").exists():
        assert provenance.git_commit().split(" ")[0] == head.stdout.strip()
    assert provenance.git_commit(tmp_path) == "unknown"  # not a git checkout
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "__init__.py").write_text("")
    assert provenance.git_commit(tmp_path) == "unknown"  # in a repository, but not tracked there
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))
    assert provenance.git_commit() == "unknown"  # git missing: never fails

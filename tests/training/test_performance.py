"""performance.* options (compile, channels_last, fused AdamW) and the sync-free grad-norm logging, on CPU."""

from __future__ import annotations

import csv
import logging

import pytest
import pytorch_lightning as pl
import torch

from support.tiny_training import TINY_BACKBONE, crop_batches, tiny_dino
from surgenet_ssl.runtime.performance import performance_options, use_fused_adamw
from surgenet_ssl.training.module import DINOModule


def _fit(model: DINOModule, tmp_path, batches: int = 2, **kwargs) -> pl.Trainer:
    args = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    args.update(kwargs)
    trainer = pl.Trainer(**args)
    trainer.fit(model, train_dataloaders=crop_batches(batches, batch_size=4))
    return trainer


def test_total_grad_norm_is_logged_every_log_every_n_steps(tmp_path) -> None:
    from pytorch_lightning.loggers import CSVLogger

    model = DINOModule(TINY_BACKBONE, tiny_dino(), batch_size=4)
    _fit(model, tmp_path, batches=4, logger=CSVLogger(tmp_path, name="csv", version=0), log_every_n_steps=2)
    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))
    norms = [(int(r["step"]), float(r["train/grad_norm"])) for r in rows if r.get("train/grad_norm")]
    assert [s for s, _ in norms] == [1, 3] and all(v > 0 for _, v in norms)


def test_channels_last_gives_the_same_loss() -> None:
    losses = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = DINOModule(TINY_BACKBONE, tiny_dino(), batch_size=4, performance={"channels_last": channels_last})
        batch = model.on_after_batch_transfer(next(iter(crop_batches(1, batch_size=4))), 0)
        if channels_last:
            conv = next(p for p in model.student.backbone.parameters() if p.ndim == 4)
            assert conv.is_contiguous(memory_format=torch.channels_last)
            assert all(c.is_contiguous(memory_format=torch.channels_last) for c in batch["crops"])
        with torch.no_grad():
            losses.append(model.dino_loss(model.student(batch["crops"]), model.teacher(batch["crops"][:2]), 0.04))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


def test_channels_last_trains_and_exports_contiguous_weights(tmp_path) -> None:
    model = DINOModule(TINY_BACKBONE, tiny_dino(), batch_size=4, performance={"channels_last": True})
    assert _fit(model, tmp_path).global_step == 2
    assert all(v.is_contiguous() for v in model.teacher_backbone_state_dict().values())  # safetensors needs it


def test_compile_falls_back_to_eager_with_a_warning(tmp_path, monkeypatch, caplog) -> None:
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    # aot_eager: dynamo's graph capture and AOT autograd as with inductor, without minutes of C++ code generation on CPU
    model = DINOModule(
        TINY_BACKBONE, tiny_dino(), batch_size=4, performance={"compile": True, "compile_backend": "aot_eager"}
    )
    keys = list(model.state_dict())
    with caplog.at_level(logging.WARNING, logger="surgenet_ssl.runtime.performance"):
        trainer = _fit(model, tmp_path)
    assert trainer.global_step == 2
    warned = [r.getMessage() for r in caplog.records if "performance.compile" in r.getMessage()]
    assert len(warned) == 2 and all("no C++ compiler here" in w for w in warned)
    assert any("student backbone" in w for w in warned) and any("teacher backbone" in w for w in warned)
    assert list(model.state_dict()) == keys


def test_compile_setup_failure_leaves_the_backbone_eager(tmp_path, monkeypatch, caplog) -> None:
    def unsupported(fn, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unsupported)
    model = DINOModule(TINY_BACKBONE, tiny_dino(), batch_size=4, performance={"compile": True})
    with caplog.at_level(logging.WARNING, logger="surgenet_ssl.runtime.performance"):
        assert _fit(model, tmp_path).global_step == 2
    assert any("not supported here" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_compile_true_compiles_or_falls_back_and_training_runs(tmp_path, caplog) -> None:
    torch.manual_seed(0)
    # aot_eager: dynamo's graph capture and AOT autograd as with inductor, without minutes of C++ code generation on CPU
    model = DINOModule(
        TINY_BACKBONE, tiny_dino(), batch_size=4, performance={"compile": True, "compile_backend": "aot_eager"}
    )
    keys = list(model.state_dict())
    with caplog.at_level(logging.WARNING, logger="surgenet_ssl.runtime.performance"):
        trainer = _fit(model, tmp_path)
    assert trainer.global_step == 2 and list(model.state_dict()) == keys
    compiled = model.student.backbone._compiled_call_impl is not None
    warned = any("performance.compile" in r.getMessage() for r in caplog.records)
    assert compiled != warned  # compiled, or fell back with the warning
    # compiled or not, the backbone computes the same function as its eager self
    x = torch.randn(2, 3, 32, 32)
    model.student.backbone.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model.student.backbone(x), model.student.backbone._call_impl(x), rtol=1e-4, atol=1e-5
        )


def test_fused_adamw_only_on_cuda_without_the_fp16_scaler() -> None:
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert use_fused_adamw(True, cuda, "bf16-mixed") and use_fused_adamw(True, cuda, "32-true")
    assert not use_fused_adamw(True, cuda, "16-mixed")  # Lightning must unscale before DINO clipping
    assert not use_fused_adamw(True, cpu, "32-true") and not use_fused_adamw(False, cuda, "bf16-mixed")
    model = DINOModule(TINY_BACKBONE, tiny_dino(), batch_size=4)
    trainer = _fit(model, None, batches=1)
    assert not trainer.optimizers[0].defaults.get("fused")


def test_performance_options_reject_unknown_keys() -> None:
    assert performance_options(None)["compile"] is False
    with pytest.raises(ValueError, match="unknown performance option"):
        performance_options({"compiel": True})


def test_compile_falls_back_to_eager_when_the_backward_fails_to_compile(tmp_path, caplog) -> None:
    """With static shapes the backward graph compiles at the first backward(), in Lightning's loop: a failure
    there must fall back to eager with the warning too (here a backward compiler that always fails)."""
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    calls: list[str] = []

    def forward_compiler(gm, example_inputs):
        calls.append("forward")
        return gm.forward

    def failing_backward_compiler(gm, example_inputs):
        calls.append("backward")
        raise RuntimeError("backward codegen failed")

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=failing_backward_compiler)
    model = DINOModule(TINY_BACKBONE, tiny_dino(), batch_size=4, performance={"compile": True})
    model.performance["compile_backend"] = backend  # a callable backend, not a config value
    with caplog.at_level(logging.WARNING, logger="surgenet_ssl.runtime.performance"):
        trainer = _fit(model, tmp_path)
    assert trainer.global_step == 2 and "backward" in calls
    warned = [r.getMessage() for r in caplog.records if "performance.compile" in r.getMessage()]
    assert any("student backbone" in w and "backward codegen failed" in w for w in warned)
    assert model.student.backbone._compiled_call_impl is None  # eager from then on
    torch._dynamo.reset()

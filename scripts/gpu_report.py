"""GPU report: the training-step figures the README's benchmark section is waiting for, in one run on a GPU node.

The default run (on CUDA, within about six minutes, guarded by ``--time-budget``) prints markdown tables of:

1. the matrix backbone (caformer_s18, convnextv2_tiny, pvt_v2_b2, vit_small) x precision (bf16-mixed, 16-mixed) x
   torch.compile (off, on): the Lightning step of the real ``DINOModule`` at recipe crop sizes (2x224 + 8x96) on
   fixed synthetic uint8 batches (the loader is not measured): samples/s per GPU, ms/step, peak device memory;
2. the largest per-GPU batch that fits, per backbone, in bf16 (doubling, then bisection on OutOfMemoryError);
3. host syncs per training step, counted with ``torch.cuda.set_sync_debug_mode("warn")`` (CPU and GPU
   augmentation batches); the target is 0 inside the training step;
4. the data-wait fraction of the real loader (demo dataset) feeding the step, CPU vs GPU augmentation, 16 workers;
5. the GPU multi-crop augmentation (``data.augment_on=gpu``) alone: frames/s, and whether it or the gradient
   clipping synchronises with the host, and its ATen ops per call (kernel launches).

Order (a spent budget costs the last parts first): the GPU augmentation and the host syncs, the eager matrix
cells, the data wait, the largest batch, then the compile cells (each started only with >= 180 s of budget left,
its seconds reported). ``--time-budget`` (default 300 s): no cell starts after it, so a run ends within about six
minutes. ``--variants`` adds the older table of cumulative hot-path variants for ``--backbone`` (``baseline``:
float32 crops, unpinned; ``uint8``; ``fused``: + fused AdamW, cudnn.benchmark; ``channels_last``; ``compile``).

Nothing measured is lost: ``--out`` (a ``.json`` file, or a directory such as ``$OUT`` that gets
``gpu_report.json``) is rewritten atomically after every cell, with the cells not run yet marked "pending"; a run
stopped by SIGTERM (``timeout``) writes and prints what it has. ``/dev/shm`` is checked first (the loader's
workers pass batches through it). cuDNN/cuBLAS allocation failures count as out of memory.

``--tiny`` checks the plumbing on CPU in well under a minute (tiny timm backbone and crops, a cell or two of each
part, "n/a on CPU" where CUDA is needed; its numbers mean nothing). The LAST line is
``best_samples_per_s=<float> backbone=<name> precision=<p> compile=<bool> host_syncs_per_step=<int|na>``.

    python scripts/gpu_report.py                          # the full report (CUDA)
    python scripts/gpu_report.py --out "$OUT"               # JSON written into the directory $OUT after every cell
    python scripts/gpu_report.py --backbones vit_small --parts matrix,max_batch --out gpu_report.json
    python scripts/gpu_report.py --parts none --variants baseline,uint8,compile   # the hot-path variants only
    python scripts/gpu_report.py --tiny                   # CPU plumbing check
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import signal
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from surgenet_ssl.data.augment import IMAGENET_MEAN, IMAGENET_STD
from surgenet_ssl.data.gpu_augment import GpuMultiCrop
from surgenet_ssl.dino import clip_gradients_per_parameter
from surgenet_ssl.dino.recipe import dino_recipe
from surgenet_ssl.runtime.performance import AtenOpCounter
from surgenet_ssl.training.module import DINOModule

OFF = {"compile": False, "channels_last": False, "fused_adamw": False, "cudnn_benchmark": False}
# the training defaults (surgenet_ssl/configs/train.yaml performance:), with compile switched by the matrix
TRAIN_PERF = {"compile": False, "channels_last": False, "fused_adamw": True, "cudnn_benchmark": True}
# cumulative: each variant adds one thing to the previous one -> (uint8 crops, performance options)
VARIANTS: dict[str, tuple[bool, dict[str, Any]]] = {
    "baseline": (False, OFF),
    "uint8": (True, OFF),
    "fused": (True, {**OFF, "fused_adamw": True, "cudnn_benchmark": True}),
    "channels_last": (True, {**OFF, "fused_adamw": True, "cudnn_benchmark": True, "channels_last": True}),
    "compile": (True, {"fused_adamw": True, "cudnn_benchmark": True, "channels_last": True, "compile": True}),
}
BACKBONES = ("caformer_s18", "convnextv2_tiny", "pvt_v2_b2", "vit_small")
PARTS = ("matrix", "max_batch", "syncs", "data_wait", "augment")
# (valid h, w) of 4:3, 5:4, 1:1 and 16:9 frames in the 320x568 canvas (shorter side 320)
ASPECTS = ((320, 427), (320, 400), (320, 320), (320, 568))
NA_CPU = "n/a on CPU"
OVER_BUDGET = "skipped (time budget)"
PENDING = "pending (not run yet)"
PREFETCH = 4  # the loader's prefetch_factor in the data-wait part
COMPILE_MIN_LEFT = 180.0  # seconds of budget a compile cell needs to be started


def dino_cfg(args: argparse.Namespace) -> dict:
    """surgenet_ssl/configs/dino/default.yaml with this run's sizes."""
    return dino_recipe(
        **{
            "out_dim": args.out_dim,
            "head.hidden_dim": args.hidden_dim,
            "crops.global_size": args.global_size,
            "crops.local_size": args.local_size,
            "crops.local_number": args.local_number,
            "optimizer.warmup_epochs": 1,
            "optimizer.freeze_last_layer": 0,
        }
    )


def backbone_cfg(name: str) -> dict:
    """surgenet_ssl/configs/backbone/<name>.yaml for the SurgeNet backbones (vit_small: timm's ViT-S/16 with dynamic
    image size, built by the registry), else ``backbone=timm backbone.timm_name=<name>``."""
    if name in BACKBONES:
        return {"name": name, "timm_name": None, "drop_path_rate": 0.1}
    return {"name": "timm", "timm_name": name, "drop_path_rate": 0.1}


def synthetic_batches(
    args: argparse.Namespace, uint8: bool, batch_size: int | None = None, n: int = 2, frames: bool = False
) -> list[dict]:
    """``n`` fixed batches: uint8 crops as the loader ships them, the same crops normalised to float32, or
    (``frames``) uint8 canvases + valid sizes as the loader ships them with ``data.augment_on=gpu``."""
    b = batch_size or args.batch_size
    g = torch.Generator().manual_seed(0)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    sizes = [args.global_size] * 2 + [args.local_size] * args.local_number
    out = []
    for _ in range(n):
        extra = {"source": torch.zeros(b, dtype=torch.long), "key": [""] * b}
        if frames:
            ch, cw = args.canvas
            hw = torch.tensor([[round(h * ch / 320), min(cw, round(w * ch / 320))] for h, w in ASPECTS] * b)[:b]
            out.append(
                {
                    "frames": torch.randint(0, 256, (b, 3, ch, cw), generator=g, dtype=torch.uint8),
                    "frame_hw": hw,
                    **extra,
                }
            )
            continue
        crops = [torch.randint(0, 256, (b, 3, s, s), generator=g, dtype=torch.uint8) for s in sizes]
        if not uint8:
            crops = [(c.float() / 255.0 - mean) / std for c in crops]
        out.append({"crops": crops, **extra})
    return out


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the RuntimeErrors of cuDNN/cuBLAS when their workspace cannot be allocated
    (``CUDNN_STATUS_ALLOC_FAILED``, ``CUBLAS_STATUS_ALLOC_FAILED``, "... out of memory"): the same limit."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text.lower() or "ALLOC_FAILED" in text)


SHM_MIN_GB = 2.0


def shm_check(path: str = "/dev/shm") -> dict[str, Any]:
    """Size of ``/dev/shm``: the loader's workers pass every batch through it, and a container's default (64 MiB)
    makes them fail with a bus error or "No space left on device" as soon as a few batches of crops queue up."""
    try:
        usage = shutil.disk_usage(path)
    except OSError as err:
        return {"dev_shm_gb": None, "dev_shm_note": f"{path} unavailable ({err.strerror}): loader workers may fail"}
    gb = usage.total / 1024**3
    out: dict[str, Any] = {"dev_shm_gb": round(gb, 2), "dev_shm_free_gb": round(usage.free / 1024**3, 2)}
    if gb < SHM_MIN_GB:
        out["dev_shm_note"] = (
            f"{path} is {gb:.2f} GiB (< {SHM_MIN_GB:g}): loader workers may fail; give the container more "
            "(docker run --shm-size=16g) or use fewer workers"
        )
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    """Give the device memory of the last run back, so the next one (or the next batch size) starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class _Timer(pl.Callback):
    """Wall time of the steps after ``warmup`` (one device synchronisation at each end, none in between)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if idx == self.warmup:
            _sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _sync(pl_module.device)
        self.end = time.perf_counter()


class _SyncCounter(pl.Callback):
    """Host syncs after ``warmup``, from ``set_sync_debug_mode("warn")`` warnings: inside the step (batch start to
    batch end: forward, backward, clipping, optimizer, EMA) and over the whole loop iteration (also the loader's
    next batch, its transfer and ``on_after_batch_transfer``, e.g. the GPU augmentation)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.in_step, self.in_loop, self.steps = warmup, 0, 0, 0
        self._catcher: Any = None
        self._log: list = []
        self._mark = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if idx == self.warmup:  # start counting; this step's transfer is not included in the loop count
            _sync(pl_module.device)
            self._catcher = warnings.catch_warnings(record=True)
            self._log = self._catcher.__enter__()
            warnings.simplefilter("always")  # each sync warns; without "always" repeats are shown once
            torch.cuda.set_sync_debug_mode("warn")
        self._mark = len(self._log)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, idx) -> None:
        if self._catcher is not None:
            self.in_step += sum(_is_sync(w) for w in self._log[self._mark :])
            self.in_loop = sum(_is_sync(w) for w in self._log)  # up to here: not the end-of-training work
            self.steps += 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._catcher is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._catcher.__exit__(None, None, None)
            self._catcher = None


def _is_sync(w: warnings.WarningMessage) -> bool:
    return "synchroniz" in str(w.message).lower()


class _WaitTimer(pl.Callback):
    """Time waiting for the next batch (end of one step to the start of the next) vs the whole step, after
    ``warmup`` steps: the measure of surgenet_ssl/callbacks/throughput.py, summed once instead of logged per window
    (that callback resets its window at every log and needs a logger). The device is synchronised at each batch
    end, so the wait is time the GPU sits idle; with ``augment_on=gpu`` the wait includes launching the
    augmentation (``on_after_batch_transfer`` runs before the batch start), as in training's own metric."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.wait, self.total, self.steps, self.images = warmup, 0.0, 0.0, 0, 0
        self.per_step: list[tuple[float, float]] = []  # (wait, wait + step) of each timed step
        self._last_end: float | None = None
        self._start, self._wait = 0.0, 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        now = time.perf_counter()
        self._wait = now - self._last_end if idx > self.warmup and self._last_end is not None else 0.0
        self._start = now

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, idx) -> None:
        _sync(pl_module.device)  # the step's device work belongs to the step, not to the next wait
        now = time.perf_counter()
        if idx > self.warmup:
            self.per_step.append((self._wait, self._wait + now - self._start))
            self.wait += self._wait
            self.total += self._wait + now - self._start
            self.steps += 1
            self.images += trainer.lightning_module.batch_size
        self._last_end = now


def _trainer(device: torch.device, precision: str, steps: int, callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        accelerator=device.type,
        devices=1,
        precision=precision,
        max_epochs=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        log_every_n_steps=10,
        num_sanity_val_steps=0,
    )


def run_steps(
    args: argparse.Namespace,
    device: torch.device,
    backbone: str,
    precision: str,
    perf: dict,
    uint8: bool = True,
    batch_size: int | None = None,
    warmup: int | None = None,
    steps: int | None = None,
    frames: bool = False,
    extra_callbacks: list | None = None,
    module: DINOModule | None = None,
) -> dict[str, Any]:
    """The Lightning DINO step on fixed synthetic batches: ms/step, samples/s, peak device memory. ``module``: one
    to reuse (the largest-batch search builds one per backbone, not one per try)."""
    b = batch_size or args.batch_size
    warmup = args.warmup if warmup is None else warmup
    steps = args.steps if steps is None else steps
    torch.backends.cudnn.benchmark = False  # the options set it again when they ask for it
    torch.manual_seed(0)
    _free(device)
    if module is None:
        module = DINOModule(
            backbone_cfg(backbone), dino_cfg(args), batch_size=b, diagnostics_every_n_steps=0, performance=perf
        )
    module.batch_size = b
    data = synthetic_batches(args, uint8, b, n=1 if b > args.batch_size else 2, frames=frames)
    total = warmup + steps
    pin = (uint8 or frames) and device.type == "cuda"  # the baseline is the old path: float32, never pinned
    loader = DataLoader([data[i % len(data)] for i in range(total)], batch_size=None, pin_memory=pin)
    timer = _Timer(warmup)
    trainer = _trainer(device, precision, total, [timer, *(extra_callbacks or [])])
    trainer.fit(module, loader)
    seconds = (timer.end - timer.start) / steps
    result: dict[str, Any] = {"ms_per_step": seconds * 1e3, "samples_per_s": b / seconds}
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1024**3
    if perf.get("compile"):
        result["compiled"] = module.student.backbone._compiled_call_impl is not None
    for p in module.parameters():
        p.grad = None  # a reused module keeps no gradients (memory) into the next run
    del module, trainer, loader, data
    _free(device)
    return result


def run_variant(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    uint8, perf = VARIANTS[name]
    r = run_steps(args, device, args.backbone, args.precision, perf, uint8=uint8)
    return {
        "variant": name,
        "uint8_crops": uint8,
        **{f"performance.{k}": v for k, v in perf.items()},
        **r,
        "images_per_s": r["samples_per_s"],
    }


class Budget:
    """The --time-budget guard: parts and cells check it before they start and are skipped with a note after."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def over(self) -> bool:
        return self.left() <= 0


def matrix_cell(
    args: argparse.Namespace, device: torch.device, backbone: str, precision: str, compiled: bool
) -> dict[str, Any]:
    """One cell of the matrix; compile needs more warm-up steps (one compilation per crop size)."""
    cell: dict[str, Any] = {"backbone": backbone, "precision": precision, "compile": compiled}
    if device.type != "cuda" and (compiled or precision == "16-mixed"):
        return {**cell, "note": NA_CPU}  # compile takes minutes on CPU; fp16 autocast is a CUDA thing
    perf = {**TRAIN_PERF, "compile": compiled}
    warmup = args.warmup + (args.compile_warmup if compiled else 0)
    try:
        return {**cell, **run_steps(args, device, backbone, precision, perf, warmup=warmup)}
    except RuntimeError as err:  # (torch.cuda.OutOfMemoryError is one)
        if not is_out_of_memory(err):
            raise
    _free(device)  # outside the except: the traceback no longer holds the step's tensors
    return {**cell, "note": f"out of memory at batch {args.batch_size}"}


def max_batch(args: argparse.Namespace, device: torch.device, backbone: str, budget: Budget) -> dict[str, Any]:
    """Largest per-GPU batch of a bf16 step: double from --batch-size until OutOfMemoryError (or --max-batch),
    then bisect to within 1/8 of it. Two steps per try: the AdamW states exist from the second step on."""
    out: dict[str, Any] = {"backbone": backbone}
    if device.type != "cuda":
        return {**out, "note": NA_CPU}

    module = DINOModule(
        backbone_cfg(backbone),
        dino_cfg(args),
        batch_size=args.batch_size,
        diagnostics_every_n_steps=0,
        performance=TRAIN_PERF,
    )

    def fits(b: int) -> bool:
        try:
            run_steps(args, device, backbone, "bf16-mixed", TRAIN_PERF, batch_size=b, warmup=1, steps=1, module=module)
            ok = True
        except RuntimeError as err:  # (torch.cuda.OutOfMemoryError is one)
            if not is_out_of_memory(err):
                raise
            ok = False
        _free(device)  # outside the except: the traceback no longer holds the step's tensors
        return ok

    lo, hi, b = 0, None, args.batch_size
    while b <= args.max_batch and not budget.over():
        if not fits(b):
            hi = b
            break
        lo, b = b, b * 2
    while hi is not None and hi - lo > max(1, lo // 8) and not budget.over():
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    out["max_batch"] = lo
    if hi is None and lo >= args.max_batch:
        out["note"] = f"cap {args.max_batch}: fits"
    elif budget.over():
        out["note"] = "time budget: lower bound"
    elif lo == 0:
        out["note"] = f"out of memory at {args.batch_size}"
    return out


def host_syncs(args: argparse.Namespace, device: torch.device, backbone: str, frames: bool) -> dict[str, Any]:
    """Host syncs per training step (CUDA only: the sync debug mode watches CUDA calls)."""
    out: dict[str, Any] = {"backbone": backbone, "augment_on": "gpu" if frames else "cpu"}
    if device.type != "cuda":
        return {**out, "note": NA_CPU}
    counter = _SyncCounter(args.sync_warmup)
    run_steps(
        args,
        device,
        backbone,
        "bf16-mixed",
        TRAIN_PERF,
        warmup=args.sync_warmup,
        steps=args.sync_steps,
        frames=frames,
        extra_callbacks=[counter],
    )
    n = max(1, counter.steps)
    return {
        **out,
        "syncs_per_step": round(counter.in_step / n, 2),
        "loop_syncs_per_step": round(counter.in_loop / n, 2),
    }


def data_wait(args: argparse.Namespace, device: torch.device, augment_on: str) -> dict[str, Any]:
    """The real loader (demo dataset, StreamingDataModule) feeding the DINO step: fraction of the step time spent
    waiting for the next batch, with the multi-crop augmentation in the workers (cpu) or on the device (gpu)."""
    from surgenet_ssl.data.demo import ensure_demo_dataset
    from surgenet_ssl.training.datamodule import StreamingDataModule

    backbone = args.backbones[0]
    slots = args.workers * PREFETCH  # batches the workers queue before the first step: they hide the loader
    out: dict[str, Any] = {"backbone": backbone, "augment_on": augment_on, "workers": args.workers}
    out["timed_steps"], out["queue_slots"] = slots + args.data_steps, slots
    cache = Path(args.cache_dir).expanduser()
    ensure_demo_dataset(cache)
    # timed: the queued batches and then data_steps more, so the steady state (the loader's own rate) is in it;
    # +1: the first wait includes the worker start-up, never counted
    total = args.data_warmup + slots + args.data_steps + 1
    dataset = {
        "name": "demo",
        "generate": "demo",
        "root": str(cache),
        "sources": None,
        "fraction": 1.0,
        "allow_missing": False,
        "path": None,
    }
    data = {
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "augment_on": augment_on,
        "augment_backend": "fast",
        "gpu_frame_size": list(args.canvas),
        "uint8_crops": True,
        "pin_memory": "auto",
        "persistent_workers": True,
        "prefetch_factor": PREFETCH,
        "steps_per_epoch": total,
        "shuffle_buffer": 200,
    }
    cfg = dino_cfg(args)
    dm = StreamingDataModule(dataset, data, cfg["crops"], str(cache), seed=0)
    torch.manual_seed(0)
    _free(device)
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    module = DINOModule(
        backbone_cfg(backbone), cfg, batch_size=args.batch_size, diagnostics_every_n_steps=0, performance=TRAIN_PERF
    )
    timer = _WaitTimer(args.data_warmup)
    _trainer(device, precision, total, [timer]).fit(module, datamodule=dm)
    del module
    _free(device)
    if not timer.steps or timer.total <= 0:
        return {**out, "note": "no timed steps"}
    steady = timer.per_step[slots:]  # after the queued batches: the loader's own rate
    steady_total = sum(t for _, t in steady)
    return {
        **out,
        "data_wait_fraction": timer.wait / timer.total,
        "steady_data_wait_fraction": sum(w for w, _ in steady) / steady_total if steady_total > 0 else None,
        "ms_per_step": timer.total / timer.steps * 1e3,
        "samples_per_s": timer.images / timer.total,
    }


def augment_report(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """GPU multi-crop throughput on mixed-aspect frames, and (CUDA) whether it synchronises with the host."""
    b, (ch, cw) = args.batch_size, args.canvas
    g = torch.Generator(device=device).manual_seed(0)
    frames = torch.randint(0, 256, (b, 3, ch, cw), generator=g, dtype=torch.uint8, device=device)
    scale = ch / 320
    sizes = torch.tensor([[round(h * scale), min(cw, round(w * scale))] for h, w in ASPECTS] * (b // 4 + 1))[:b]
    sizes = sizes.to(device)
    aug = GpuMultiCrop(args.global_size, args.local_size, local_crops_number=args.local_number)
    for _ in range(2):
        aug(frames, g, sizes=sizes)
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.aug_iters):
        aug(frames, g, sizes=sizes)
    _sync(device)
    per_batch = (time.perf_counter() - start) / args.aug_iters
    out: dict[str, Any] = {"gpu_augment_frames_per_s": b / per_batch, "gpu_augment_ms_per_batch": per_batch * 1e3}
    with AtenOpCounter() as ops:
        aug(frames, g, sizes=sizes)
    out["gpu_augment_ops_per_call"] = ops.total  # each one a kernel launch (scripts/bench_gpu_augment.py)
    if device.type == "cuda":
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)).to(device)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        for what, fn in (
            ("gpu_augment", lambda: aug(frames, g, sizes=sizes)),
            ("clip_gradients", lambda: clip_gradients_per_parameter(model, 3.0)),
        ):
            torch.cuda.synchronize(device)
            torch.cuda.set_sync_debug_mode("error")
            try:
                fn()
                out[f"{what}_host_syncs"] = "none"
            except RuntimeError as err:
                out[f"{what}_host_syncs"] = str(err).splitlines()[0]
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return out


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table: header, separator, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


def render(report: dict[str, Any]) -> list[str]:
    """All tables of the report, in the order of the module docstring."""
    out: list[str] = []
    if report.get("matrix"):
        out += ["", "### Training step (recipe crops, synthetic uint8 batches, per GPU)", ""]
        out += table(
            [
                "backbone",
                "precision",
                "compile",
                "batch",
                "samples/s",
                "ms/step",
                "peak memory (GiB)",
                "cell s",
                "note",
            ],
            [
                [
                    c["backbone"],
                    c["precision"],
                    "on" if c["compile"] else "off",
                    report["batch_size"],
                    c.get("samples_per_s"),
                    c.get("ms_per_step"),
                    _fmt(c.get("peak_memory_gb"), ".2f"),
                    c.get("seconds"),
                    c.get("note", "" if c.get("compiled", True) else "compile fell back to eager"),
                ]
                for c in report["matrix"]
            ],
        )
    if report.get("max_batch"):
        out += ["", "### Largest batch per GPU (bf16-mixed)", ""]
        out += table(
            ["backbone", "max batch", "note"],
            [[r["backbone"], r.get("max_batch"), r.get("note", "")] for r in report["max_batch"]],
        )
    if report.get("syncs"):
        out += [
            "",
            "### Host syncs per training step (bf16-mixed; target 0 in the step)",
            "",
            'Counted with `torch.cuda.set_sync_debug_mode("warn")`. The module\'s one pipelined flag read per '
            "step (an event wait on the previous step's flags, designed not to block) is not such a sync.",
            "",
        ]
        out += table(
            ["backbone", "augment_on", "in the step", "whole loop iteration", "note"],
            [
                [
                    r["backbone"],
                    r["augment_on"],
                    r.get("syncs_per_step"),
                    r.get("loop_syncs_per_step"),
                    r.get("note", ""),
                ]
                for r in report["syncs"]
            ],
        )
    if report.get("data_wait"):
        out += [
            "",
            "### Data wait: the real loader (demo dataset) feeding the step",
            "",
            "Timed: the batches the workers queued before the first step (workers x prefetch 4), then --data-steps "
            "more; 'after the queue' is the fraction over those (the loader's own rate).",
            "",
        ]
        out += table(
            [
                "backbone",
                "augment_on",
                "workers",
                "timed steps",
                "data-wait fraction",
                "after the queue",
                "ms/step",
                "samples/s",
                "note",
            ],
            [
                [
                    r["backbone"],
                    r["augment_on"],
                    r["workers"],
                    r.get("timed_steps"),
                    _fmt(r.get("data_wait_fraction"), ".3f"),
                    _fmt(r.get("steady_data_wait_fraction"), ".3f"),
                    r.get("ms_per_step"),
                    r.get("samples_per_s"),
                    r.get("note", ""),
                ]
                for r in report["data_wait"]
            ],
        )
    if report.get("steps"):
        out += ["", f"### Hot-path variants ({report['backbone']}, {report['precision']})", ""]
        out += table(
            ["variant", "ms/step", "images/s"],
            [[r["variant"], r["ms_per_step"], r["images_per_s"]] for r in report["steps"]],
        )
    aug = {k: v for k, v in report.items() if k.startswith(("gpu_augment", "clip_gradients"))}
    if aug:
        out += ["", "### GPU augmentation", ""]
        out += table(["what", "value"], [[k, v] for k, v in aug.items()])
    return out


def summary_line(report: dict[str, Any]) -> str:
    """The machine-readable last line: the fastest measured cell (or variant) and the host syncs in the step."""
    cells = [c for c in report.get("matrix", []) if "samples_per_s" in c]
    cells += [
        {
            "samples_per_s": r["samples_per_s"],
            "backbone": report["backbone"],
            "precision": report["precision"],
            "compile": bool(r.get("performance.compile")),
        }
        for r in report.get("steps", [])
    ]
    best = max(cells, key=lambda c: c["samples_per_s"], default=None)
    syncs = [r["syncs_per_step"] for r in report.get("syncs", []) if "syncs_per_step" in r]
    sync = str(round(max(syncs))) if syncs else "na"
    if best is None:
        return f"best_samples_per_s=nan backbone=na precision=na compile=na host_syncs_per_step={sync}"
    return (
        f"best_samples_per_s={best['samples_per_s']:.1f} backbone={best['backbone']} "
        f"precision={best['precision']} compile={best['compile']} host_syncs_per_step={sync}"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU plumbing check: tiny backbone and crops, seconds")
    ap.add_argument("--backbones", default=",".join(BACKBONES), help="comma-separated, for the matrix and the rest")
    ap.add_argument("--precisions", default="bf16-mixed,16-mixed", help="comma-separated, for the matrix")
    ap.add_argument("--compile", default="off,on", help="matrix compile settings: off, on or off,on")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)} (or none)")
    ap.add_argument("--backbone", default="caformer_s18", help="for --variants: a SurgeNet name or any timm model")
    ap.add_argument("--batch-size", type=int, default=64, help="per GPU, for all parts; max_batch starts here")
    ap.add_argument("--max-batch", type=int, default=1024, help="cap of the largest-batch search")
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=96)
    ap.add_argument("--local-number", type=int, default=8)
    ap.add_argument("--out-dim", type=int, default=65536)
    ap.add_argument("--hidden-dim", type=int, default=2048)
    ap.add_argument("--precision", default=None, help="for --variants; default: bf16-mixed on CUDA, 32-true on CPU")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per cell (after --warmup)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps (cudnn autotuning, allocator)")
    ap.add_argument("--compile-warmup", type=int, default=3, help="extra untimed steps of compiled cells")
    ap.add_argument("--sync-warmup", type=int, default=3, help="steps before the host syncs are counted")
    ap.add_argument("--sync-steps", type=int, default=3, help="steps whose host syncs are counted")
    ap.add_argument("--workers", type=int, default=16, help="loader workers of the data-wait part")
    ap.add_argument(
        "--data-steps", type=int, default=40, help="timed steps of the data-wait part after the workers x 4 queued"
    )
    ap.add_argument("--data-warmup", type=int, default=16, help="untimed steps: the workers start and fill up")
    ap.add_argument(
        "--cache-dir",
        default=os.environ.get("SURGENET_SSL_CACHE", "~/.cache/surgenet_ssl"),
        help="where the demo dataset is (generated there on first use)",
    )
    ap.add_argument(
        "--time-budget",
        type=float,
        default=300.0,
        help="seconds; cells and parts not started by then are skipped with a note (300: ends within ~6 min)",
    )
    ap.add_argument("--aug-iters", type=int, default=10)
    ap.add_argument("--variants", default=None, help=f"comma-separated, of {','.join(VARIANTS)}: adds that table")
    ap.add_argument("--out", help="a .json file or a directory (gets gpu_report.json): rewritten after every cell")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    args.canvas = (320, 568)
    if args.tiny:  # small everything; CUDA-only cells are listed as n/a
        args.backbone, args.batch_size, args.global_size, args.local_size = "test_resnet", 4, 32, 16
        args.local_number = 2
        args.out_dim, args.hidden_dim, args.steps, args.warmup, args.aug_iters = 64, 32, 2, 1, 2
        args.canvas, args.workers, args.data_steps, args.data_warmup = (40, 72), min(args.workers, 1), 2, 1
        if args.backbones == ",".join(BACKBONES):
            args.backbones = "test_resnet"
        if args.precisions == "bf16-mixed,16-mixed":  # bf16 autocast is slow on CPU; 16-mixed shows the n/a row
            args.precisions = "32-true,16-mixed"
    args.backbones = [b for b in args.backbones.split(",") if b]
    precisions = [p for p in args.precisions.split(",") if p]
    compiles = [{"off": False, "on": True}[c] for c in args.compile.split(",") if c]
    parts = [] if args.parts == "none" else args.parts.split(",")
    variants = args.variants.split(",") if args.variants else []
    for what, got, known in (("part", parts, PARTS), ("variant", variants, VARIANTS)):
        if any(x not in known for x in got):
            ap.error(f"unknown {what}(s) {[x for x in got if x not in known]}; choose from {list(known)}")
    args.precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("surgenet_ssl").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    budget = Budget(args.time_budget)
    out_path = report_path(args.out)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    shm = shm_check()
    print(
        f"device {name}, backbones {','.join(args.backbones)}, batch {args.batch_size}, crops 2x{args.global_size} "
        f"+ {args.local_number}x{args.local_size}, {args.steps} timed steps ({args.warmup} warm-up), "
        f"time budget {args.time_budget:.0f} s, /dev/shm {shm['dev_shm_gb']} GiB",
        flush=True,
    )
    if "dev_shm_note" in shm:
        print(f"WARNING: {shm['dev_shm_note']}", flush=True)
    cells = [(b, p, c) for b in args.backbones for p in precisions for c in compiles]
    report: dict[str, Any] = {
        "device": name,
        "backbone": args.backbone,
        "backbones": args.backbones,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "tiny": args.tiny,
        **shm,
        "finished": False,
        "matrix": [{"backbone": b, "precision": p, "compile": c, "note": PENDING} for b, p, c in cells],
        "max_batch": [],
        "syncs": [],
        "data_wait": [],
        "steps": [],
    }

    def save() -> None:
        if out_path is not None:
            write_json_atomically(out_path, report)

    save()
    longest: dict[str, float] = {"compile": COMPILE_MIN_LEFT}  # seconds a cell of that kind needs (at least)

    def guarded(fn: Any, skipped: dict[str, Any], kind: str = "") -> dict[str, Any]:
        """Run ``fn`` unless the budget cannot hold it (as long as the longest cell of its ``kind`` so far). A part
        that fails gets a note instead of ending the report: the GPU run is one shot. Progress goes to stderr."""
        if budget.left() <= longest.get(kind, 0.0):
            return {**skipped, "note": OVER_BUDGET}
        t0 = time.perf_counter()
        try:
            r = fn()
        except Exception as err:  # noqa: BLE001 - reported in the table
            first = (str(err).splitlines() or [""])[0][:100]
            r = {**skipped, "note": f"failed: {type(err).__name__}: {first}"}
        seconds = time.perf_counter() - t0
        r["seconds"] = round(seconds, 1)
        if kind:
            longest[kind] = max(longest[kind], seconds)
        print(f"[{time.perf_counter() - budget.start:6.0f} s] {r}", file=sys.stderr, flush=True)
        return r

    try:
        # cheap and most wanted first; a spent budget costs the compile cells first
        if "augment" in parts:
            aug = guarded(partial(augment_report, args, device), {})
            aug["gpu_augment_seconds"] = aug.pop("seconds", None)
            if "note" in aug:
                aug["gpu_augment_note"] = aug.pop("note")
            report.update(aug)
            save()
        if "syncs" in parts:
            for frames in (False, True):
                report["syncs"].append(
                    guarded(
                        partial(host_syncs, args, device, args.backbones[0], frames),
                        {"backbone": args.backbones[0], "augment_on": "gpu" if frames else "cpu"},
                    )
                )
                save()
        for i, (b, p, c) in enumerate(cells):
            if "matrix" in parts and not c:
                report["matrix"][i] = guarded(
                    partial(matrix_cell, args, device, b, p, c), {"backbone": b, "precision": p, "compile": c}
                )
                save()
        if "data_wait" in parts:
            for on in ("cpu", "gpu"):
                report["data_wait"].append(
                    guarded(
                        partial(data_wait, args, device, on),
                        {"backbone": args.backbones[0], "augment_on": on, "workers": args.workers},
                    )
                )
                save()
        if "max_batch" in parts:
            for b in args.backbones:
                report["max_batch"].append(guarded(partial(max_batch, args, device, b, budget), {"backbone": b}))
                save()
        for i, (b, p, c) in enumerate(cells):
            if "matrix" in parts and c:
                report["matrix"][i] = guarded(
                    partial(matrix_cell, args, device, b, p, c),
                    {"backbone": b, "precision": p, "compile": c},
                    kind="compile",
                )
                save()
        if "matrix" not in parts:
            report["matrix"] = []
        for v in variants:
            report["steps"].append(guarded(partial(run_variant, v, args, device), {"variant": v}))
            save()
        report["steps"] = [r for r in report["steps"] if "images_per_s" in r]
        report["finished"] = True
    finally:  # also on SIGTERM (timeout) or Ctrl-C: what was measured is written and printed
        report["summary"] = summary_line(report)
        save()
        print("\n".join(render(report)))
        if out_path is not None:
            print(f"\nreport written to {out_path}")
        print(report["summary"], flush=True)
    return report


def report_path(out: str | None) -> Path | None:
    """``--out``: a ``.json`` file, or a directory (created; e.g. ``$OUT``) that gets ``gpu_report.json``."""
    if not out:
        return None
    path = Path(out).expanduser()
    if path.suffix.lower() != ".json" or path.is_dir():
        path = path / "gpu_report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    """Write to a temporary file, then rename: a run killed mid-write leaves the previous complete file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through main's finally: the report is written and printed


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    main()

"""GPU report: the training-step figures the README's benchmark section is waiting for, in one run on a GPU node.

Measures, on the device this runs on:

1. the Lightning DINO step (the real ``DINOModule``; fixed synthetic batches, so the loader is not measured) for
   cumulative variants of the GPU-lean hot path:
   ``baseline`` (float32 crops, unpinned, no performance option), ``uint8`` (uint8 crops, pinned, normalised on the
   device), ``fused`` (+ fused AdamW and cudnn.benchmark), ``channels_last`` (+ NHWC), ``compile`` (+ torch.compile):
   ms/step, images/s, peak device memory;
2. the GPU multi-crop augmentation (``data.augment_on=gpu``) on a batch of mixed-aspect frames: frames/s;
3. on CUDA, whether the augmentation and the gradient clipping synchronise with the host
   (``torch.cuda.set_sync_debug_mode("error")`` around one call).

``--tiny`` checks the plumbing on CPU in seconds (tiny timm backbone, small crops; its numbers mean nothing).
Writes the results as JSON with ``--out``. The LAST line is
``best_variant=<name> images_per_s=<float> baseline_images_per_s=<float>``.

    python scripts/gpu_report.py                          # caformer_s18, 2x224 + 8x96 crops, batch 64, bf16-mixed
    python scripts/gpu_report.py --batch-size 128 --variants baseline,uint8,compile --out gpu_report.json
    python scripts/gpu_report.py --tiny                   # CPU plumbing check
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from surgenet_ssl.data.augment import IMAGENET_MEAN, IMAGENET_STD
from surgenet_ssl.data.gpu_augment import GpuMultiCrop
from surgenet_ssl.dino import clip_gradients_per_parameter
from surgenet_ssl.module import DINOModule

OFF = {"compile": False, "channels_last": False, "fused_adamw": False, "cudnn_benchmark": False}
# cumulative: each variant adds one thing to the previous one -> (uint8 crops, performance options)
VARIANTS: dict[str, tuple[bool, dict[str, Any]]] = {
    "baseline": (False, OFF),
    "uint8": (True, OFF),
    "fused": (True, {**OFF, "fused_adamw": True, "cudnn_benchmark": True}),
    "channels_last": (True, {**OFF, "fused_adamw": True, "cudnn_benchmark": True, "channels_last": True}),
    "compile": (True, {"fused_adamw": True, "cudnn_benchmark": True, "channels_last": True, "compile": True}),
}
# (valid h, w) of 4:3, 5:4, 1:1 and 16:9 frames in the 320x568 canvas (shorter side 320)
ASPECTS = ((320, 427), (320, 400), (320, 320), (320, 568))


def dino_cfg(args: argparse.Namespace) -> dict:
    return {
        "out_dim": args.out_dim,
        "head": {"hidden_dim": args.hidden_dim, "bottleneck_dim": 256, "nlayers": 3, "use_bn": False,
                 "norm_last_layer": True},
        "crops": {"global_size": args.global_size, "local_size": args.local_size, "global_scale": [0.4, 1.0],
                  "local_scale": [0.05, 0.4], "local_number": args.local_number},
        "loss": {"student_temp": 0.1, "teacher_temp": 0.04, "warmup_teacher_temp": 0.04,
                 "warmup_teacher_temp_epochs": 0, "center_momentum": 0.9},
        "optimizer": {"base_lr": 5e-4, "reference_batch": 256, "min_lr": 1e-6, "warmup_epochs": 1,
                      "weight_decay": 0.04, "weight_decay_end": 0.4, "clip_grad": 3.0, "freeze_last_layer": 0},
        "teacher": {"momentum": 0.996, "momentum_end": 1.0},
    }  # fmt: skip


def backbone_cfg(name: str) -> dict:
    if name in ("caformer_s18", "convnextv2_tiny", "pvt_v2_b2", "vit_small"):
        return {"name": name, "timm_name": None, "drop_path_rate": 0.1}
    return {"name": "timm", "timm_name": name, "drop_path_rate": 0.1}


def synthetic_batches(args: argparse.Namespace, uint8: bool) -> list[dict]:
    """Two fixed batches: uint8 crops as the loader ships them, or the same crops normalised to float32."""
    g = torch.Generator().manual_seed(0)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    sizes = [args.global_size] * 2 + [args.local_size] * args.local_number
    out = []
    for _ in range(2):
        crops = [torch.randint(0, 256, (args.batch_size, 3, s, s), generator=g, dtype=torch.uint8) for s in sizes]
        if not uint8:
            crops = [(c.float() / 255.0 - mean) / std for c in crops]
        out.append({"crops": crops, "source": torch.zeros(args.batch_size, dtype=torch.long),
                    "key": [""] * args.batch_size})  # fmt: skip
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def run_variant(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    uint8, perf = VARIANTS[name]
    torch.backends.cudnn.benchmark = False  # the variant sets it again when it asks for it
    torch.manual_seed(0)
    module = DINOModule(backbone_cfg(args.backbone), dino_cfg(args), batch_size=args.batch_size,
                        diagnostics_every_n_steps=0, performance=perf)  # fmt: skip
    data = synthetic_batches(args, uint8)
    total = args.warmup + args.steps
    pin = uint8 and device.type == "cuda"  # the baseline is the old path: float32, never pinned
    loader = DataLoader([data[i % 2] for i in range(total)], batch_size=None, pin_memory=pin)
    timer = _Timer(args.warmup)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = pl.Trainer(
        accelerator=device.type, devices=1, precision=args.precision, max_epochs=1, max_steps=total, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
        log_every_n_steps=10,
    )  # fmt: skip
    trainer.fit(module, loader)
    seconds = (timer.end - timer.start) / args.steps
    result = {"variant": name, "uint8_crops": uint8, **{f"performance.{k}": v for k, v in perf.items()},
              "ms_per_step": seconds * 1e3, "images_per_s": args.batch_size / seconds}  # fmt: skip
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1024**3
    compiled = module.student.backbone._compiled_call_impl is not None
    if perf.get("compile"):
        result["compiled"] = compiled
    return result


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
    if device.type == "cuda":
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)).to(device)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        for what, fn in (("gpu_augment", lambda: aug(frames, g, sizes=sizes)),
                         ("clip_gradients", lambda: clip_gradients_per_parameter(model, 3.0))):  # fmt: skip
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU plumbing check: tiny backbone and crops, seconds")
    ap.add_argument("--backbone", default="caformer_s18", help="a SurgeNet backbone name or any timm architecture")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=96)
    ap.add_argument("--local-number", type=int, default=8)
    ap.add_argument("--out-dim", type=int, default=65536)
    ap.add_argument("--hidden-dim", type=int, default=2048)
    ap.add_argument("--precision", default=None, help="default: bf16-mixed on CUDA, 32-true on CPU")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant (after --warmup)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation, cudnn autotuning)")
    ap.add_argument("--aug-iters", type=int, default=10)
    ap.add_argument("--variants", default=None, help=f"comma-separated, of {','.join(VARIANTS)} (default: all)")
    ap.add_argument("--out", help="write the report as JSON here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    args.canvas = (320, 568)
    default_variants = list(VARIANTS)
    if args.tiny:  # small everything; torch.compile on CPU takes minutes, so only when asked for
        args.backbone, args.batch_size, args.global_size, args.local_size = "test_resnet", 4, 32, 16
        args.local_number = 2
        args.out_dim, args.hidden_dim, args.steps, args.warmup, args.aug_iters = 64, 32, 2, 1, 2
        args.canvas = (40, 72)
        default_variants = [v for v in VARIANTS if v != "compile"]
    variants = args.variants.split(",") if args.variants else default_variants
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    args.precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, backbone {args.backbone}, batch {args.batch_size}, crops 2x{args.global_size} + "
          f"{args.local_number}x{args.local_size}, {args.precision}, {args.steps} steps ({args.warmup} warm-up)")
    report: dict[str, Any] = {"device": name, "backbone": args.backbone, "batch_size": args.batch_size,
                              "precision": args.precision, "tiny": args.tiny, "steps": []}  # fmt: skip
    print("| variant | ms/step | images/s |")
    print("|---|---|---|")
    for v in variants:
        r = run_variant(v, args, device)
        report["steps"].append(r)
        print(f"| {v} | {r['ms_per_step']:.1f} | {r['images_per_s']:.1f} |", flush=True)
    report.update(augment_report(args, device))
    for key, value in report.items():
        if key.startswith(("gpu_augment", "clip_gradients")):
            print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"report written to {args.out}")
    best = max(report["steps"], key=lambda r: r["images_per_s"])
    base = next((r["images_per_s"] for r in report["steps"] if r["variant"] == "baseline"), float("nan"))
    print(f"best_variant={best['variant']} images_per_s={best['images_per_s']:.1f} baseline_images_per_s={base:.1f}")
    return report


if __name__ == "__main__":
    main()

"""Overhead of our Lightning training step over a plain PyTorch loop doing the same DINO step.

Both run the same student/teacher (same backbone, head, loss), the same fixed synthetic batches, and per step:
teacher forward on the 2 global crops, student forward on all crops, DINO loss, backward, per-parameter clipping,
last-layer freezing, AdamW with scheduled lr/wd, EMA teacher update, center update. Lightning additionally runs its
loop, hooks and metric logging (that is the overhead measured). Timing is per optimizer step after --warmup steps,
the median over the steps, with the two runs alternated --repeats times; the fastest repeat of each is compared
(other processes on a shared machine only ever slow a run down).
The LAST line is ``overhead_ratio=<lightning median step / plain median step>`` (goal <= 1.05).

    python scripts/bench_step.py                                  # timm resnet18, 2x96 + 4x48 crops, batch 16
    python scripts/bench_step.py --backbone caformer_s18 --global-size 224 --local-size 96 --local-number 8
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
import warnings
from itertools import pairwise
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from surgenet_ssl.dino import (
    cancel_last_layer_gradients,
    clip_gradients_per_parameter,
    param_groups,
    update_teacher,
)
from surgenet_ssl.dino.recipe import dino_recipe
from surgenet_ssl.training.module import DINOModule


def dino_cfg(args: argparse.Namespace) -> dict:
    """surgenet_ssl/configs/dino/default.yaml with this run's sizes."""
    return dino_recipe(
        **{
            "out_dim": args.out_dim,
            "head.hidden_dim": 2048,
            "crops.global_size": args.global_size,
            "crops.local_size": args.local_size,
            "crops.local_number": args.local_number,
            "optimizer.warmup_epochs": 1,
            "optimizer.freeze_last_layer": 1,
        }
    )


def backbone_cfg(name: str) -> dict:
    if name in ("caformer_s18", "convnextv2_tiny", "pvt_v2_b2", "vit_small"):
        return {"name": name, "timm_name": None, "drop_path_rate": 0.1}
    return {"name": "timm", "timm_name": name, "drop_path_rate": 0.1}


def batches(args: argparse.Namespace) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(4):  # cycled
        crops = [torch.randn(args.batch_size, 3, args.global_size, args.global_size, generator=g) for _ in range(2)]
        crops += [
            torch.randn(args.batch_size, 3, args.local_size, args.local_size, generator=g)
            for _ in range(args.local_number)
        ]
        out.append(
            {"crops": crops, "source": torch.zeros(args.batch_size, dtype=torch.long), "key": [""] * args.batch_size}
        )
    return out


class _StepTimer(pl.Callback):
    """Time between consecutive batch starts: the whole loop iteration (data fetch, hooks, logging included)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *a: object) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, *a: object) -> None:
        self.starts.append(time.perf_counter())

    @property
    def times(self) -> list[float]:
        return [b - a for a, b in pairwise(self.starts)]


def run_lightning(module: DINOModule, data: list[dict], steps: int) -> list[float]:
    timer = _StepTimer()
    loader = DataLoader([data[i % len(data)] for i in range(steps)], batch_size=None, shuffle=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        log_every_n_steps=50,
    )
    trainer.fit(module, loader)
    return timer.times


def run_plain(module: DINOModule, data: list[dict], steps: int) -> list[float]:
    """The same DINO step in plain PyTorch, reusing the module's parts and schedules (built for ``steps``)."""
    student, teacher, loss_fn, opt_recipe = (
        module.student,
        module.teacher,
        module.dino_loss,
        module.recipe.optimizer,
    )
    module.build_schedules(steps, steps, module.batch_size)
    opt = torch.optim.AdamW(param_groups(student), lr=module.peak_lr)
    student.train()
    times = []
    loader = DataLoader([data[i % len(data)] for i in range(steps)], batch_size=None, shuffle=False)
    t = time.perf_counter()
    for step, batch in enumerate(loader):
        crops = batch["crops"]
        lr, wd = module._scheduled("lr", step), module._scheduled("wd", step)
        for group in opt.param_groups:
            group["lr"] = lr
            if group.get("name") == "decay":
                group["weight_decay"] = wd
        with torch.no_grad():
            t_out = teacher(crops[:2])
        s_out = student(crops)
        loss = loss_fn(s_out, t_out, module._scheduled("teacher_temp", step))
        if not torch.isfinite(loss):
            raise FloatingPointError("non-finite loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients_per_parameter(student, opt_recipe.clip_grad)
        cancel_last_layer_gradients(student, 0, opt_recipe.freeze_last_layer)
        opt.step()
        update_teacher(student, teacher, module._scheduled("momentum", step))
        loss_fn.update_center()
        float(loss)  # like Lightning's logging of the loss value
        now = time.perf_counter()
        times.append(now - t)
        t = now
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--backbone",
        default="resnet18",
        help="a SurgeNet backbone name or any timm architecture",
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--global-size", type=int, default=96)
    ap.add_argument("--local-size", type=int, default=48)
    ap.add_argument("--local-number", type=int, default=4)
    ap.add_argument("--out-dim", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    torch.manual_seed(0)
    template = DINOModule(
        backbone_cfg(args.backbone), dino_cfg(args), batch_size=args.batch_size, diagnostics_every_n_steps=0
    )
    data = batches(args)
    print(
        f"backbone {args.backbone}, batch {args.batch_size}, crops 2x{args.global_size} + "
        f"{args.local_number}x{args.local_size}, {torch.get_num_threads()} threads, {args.steps} steps "
        f"({args.warmup} warm-up) x {args.repeats} repeats"
    )
    plain, light = [], []
    for r in range(args.repeats):
        p = statistics.median(run_plain(copy.deepcopy(template), data, args.steps)[args.warmup :])
        lt = statistics.median(run_lightning(copy.deepcopy(template), data, args.steps)[args.warmup :])
        plain.append(p)
        light.append(lt)
        print(f"repeat {r}: plain {p * 1e3:.1f} ms/step, lightning {lt * 1e3:.1f} ms/step")
    # The least-disturbed repeat of each (other processes only ever slow a run down).
    mp, ml = min(plain), min(light)
    print(f"best repeat's median step: plain {mp * 1e3:.1f} ms, lightning {ml * 1e3:.1f} ms")
    print(f"overhead_ratio={ml / mp:.3f}")


if __name__ == "__main__":
    main()

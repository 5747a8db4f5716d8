"""Estimate the per-GPU batch of DINO(v2) pretraining for a backbone on an N-GiB GPU, on the meta device (no GPU,
no weights, no compute): until a GPU measures it (``scripts/gpu_report.py``), this is the documented figure.

What is counted, per GPU:
- static: the student's parameters, gradients and AdamW's two moments (fp32, 16 bytes per parameter) and the
  teacher's parameters (4 bytes), backbone + DINO head;
- per sample: the tensors autograd saves for the backward pass of the student's forward over all crops (2 global
  + N local), in the training precision (bf16 under autocast: the model is cast to bf16 here, the head kept fp32
  as ``dino.head.fp32_head`` does), with and without activation checkpointing (``backbone.grad_checkpointing``).
Not counted: the teacher's forward (no_grad: transient), allocator fragmentation, CUDA context and workspace: a
margin of ``--reserve`` GiB is kept for them. On the meta device attention runs unfused, so its score matrices are
counted as saved; fused (flash) attention on a GPU saves less: without checkpointing the estimate is conservative.
The figure is an estimate: the measured one replaces it.

    python scripts/estimate_vit_memory.py                                 # dinov2_vitl14, 336/140 px, 80 GiB
    python scripts/estimate_vit_memory.py --backbone vit_small --global-size 224 --local-size 96 --local-number 8

The LAST line is ``per_gpu_batch=<n> per_gpu_batch_checkpointed=<n>``.
"""

from __future__ import annotations

import argparse

import torch

from surgenet_ssl.backbones import backbone_num_features, build_backbone
from surgenet_ssl.dino import DINOHead


def _saved_bytes(model: torch.nn.Module, head: torch.nn.Module, crops: list[torch.Tensor]) -> int:
    """Bytes of the activations autograd saves for backward (parameters excluded), one forward over ``crops``."""
    params = {id(p) for p in list(model.parameters()) + list(head.parameters())}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if id(t) not in params and not (t.is_leaf and t.requires_grad):
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        feats = [model(x) for x in crops]  # the backbone per crop size, the head once on all (MultiCropWrapper)
        head(torch.cat(feats).float())
    return total


def _crops(batch: int, args: argparse.Namespace) -> list[torch.Tensor]:
    def crop(size: int, n: int) -> torch.Tensor:
        return torch.zeros(batch * n, 3, size, size, device="meta", dtype=torch.bfloat16)

    return [crop(args.global_size, 2), crop(args.local_size, args.local_number)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="dinov2_vitl14")
    ap.add_argument("--global-size", type=int, default=336)
    ap.add_argument("--local-size", type=int, default=140)
    ap.add_argument("--local-number", type=int, default=8)
    ap.add_argument("--out-dim", type=int, default=65536)
    ap.add_argument("--gpu-gib", type=float, default=80.0)
    ap.add_argument("--reserve", type=float, default=6.0, help="GiB kept for CUDA context, workspace, fragmentation")
    args = ap.parse_args()

    per_sample, per_step = {}, {}
    for checkpointing in (False, True):
        with torch.device("meta"):
            model = build_backbone(
                args.backbone, img_size=args.global_size, grad_checkpointing=checkpointing, drop_path_rate=0.0
            )
            head = DINOHead(backbone_num_features(model), args.out_dim)
        model = model.to(torch.bfloat16).train()
        one, two = _saved_bytes(model, head, _crops(1, args)), _saved_bytes(model, head, _crops(2, args))
        per_sample[checkpointing] = two - one  # grows with the batch
        per_step[checkpointing] = one - (two - one)  # does not (the head's weight-normalised prototypes)
    n_params = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in head.parameters())
    static = n_params * (16 + 4)
    budget = {c: (args.gpu_gib - args.reserve) * 2**30 - static - per_step[c] for c in per_sample}
    gib = 2**30
    print(f"backbone {args.backbone}: {n_params / 1e6:.1f} M parameters with the head (out_dim {args.out_dim})")
    print(f"static (student fp32 + grads + AdamW moments, teacher fp32): {static / gib:.1f} GiB")
    print(f"per step, whatever the batch (the head's normalised prototypes): {per_step[False] / gib:.2f} GiB")
    for checkpointing, saved in per_sample.items():
        print(
            f"activations per sample ({args.global_size}/{args.local_size} px, 2+{args.local_number} crops, bf16, "
            f"checkpointing {'on' if checkpointing else 'off'}): {saved / gib:.3f} GiB"
        )
    # With checkpointing, backward recomputes one block at a time: its activations are live again at the peak.
    depth = len(getattr(model, "blocks", [])) or 1
    per_sample[True] += (per_sample[False] - per_sample[True]) / depth
    peak = per_sample[True] / gib
    print(f"checkpointed, with one block recomputed at the backward peak ({depth} blocks): {peak:.3f} GiB")
    batches = {c: max(0, int(budget[c] // saved)) for c, saved in per_sample.items()}
    print(f"per_gpu_batch={batches[False]} per_gpu_batch_checkpointed={batches[True]}")


if __name__ == "__main__":
    main()

"""DINOv2-style additions to the DINO recipe, in plain PyTorch (Oquab et al., "DINOv2", 2023, section 4):

- :func:`koleo_loss`: the KoLeo regulariser (Sablayrolles et al. 2019) on the student's pooled features,
  L = -1/n sum_i log(min_{j != i} ||x_i - x_j||) over L2-normalised features; spreads features in the batch.
- :func:`sinkhorn_knopp`: Sinkhorn-Knopp teacher "centering" (SwAV-style equipartition) instead of the EMA center:
  3 iterations of alternating row (prototype) / column (sample) normalisation of exp(t / teacher_temp).
- iBOT masked-patch loss (Zhou et al. 2022) for ViT backbones: the student sees its global crops with blocks of
  patches replaced by a learnable mask token (:func:`block_masks`, :func:`vit_tokens`) and predicts the teacher's
  (unmasked) patch-token distributions at the masked positions (:class:`IBOTPatchLoss`), through the DINO head
  (DINOv2's default: the head is shared).

Every function is checked against hand-computed values or the published formulas in ``tests/dino/test_dinov2.py``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "IBOTPatchLoss",
    "backbone_features",
    "MaskBatch",
    "block_mask",
    "block_masks",
    "is_vit",
    "koleo_loss",
    "mask_rng",
    "seed_rank_streams",
    "sinkhorn_knopp",
    "vit_tokens",
]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


# --------------------------------------------------------------------------------------------------------- KoLeo
def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """KoLeo: ``-mean_i log(||x_i - x_nn(i)|| + eps)`` over L2-normalised rows, ``x_nn(i)`` the nearest other row.

    The neighbour is chosen by the largest inner product (no gradient through the choice); the distance carries
    ``eps`` inside the norm like ``nn.PairwiseDistance`` (DINOv2), so duplicate rows give a large finite loss and a
    finite gradient. Computed in float32. Fewer than 2 rows: 0.
    """
    x = F.normalize(features.float(), p=2, dim=-1, eps=eps)
    n = x.shape[0]
    if n < 2:
        return x.sum() * 0.0
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)  # below any cosine: never its own neighbour
        nearest = dots.argmax(dim=1)
    distances = (x - x[nearest] + eps).norm(p=2, dim=-1)
    return -torch.log(distances + eps).mean()


# ------------------------------------------------------------------------------------------------ Sinkhorn-Knopp
@torch.no_grad()
def sinkhorn_knopp(teacher_output: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
    """Teacher targets by Sinkhorn-Knopp (DINOv2 / SwAV): rows of the result are distributions over the K prototypes.

    The published algorithm, with Q = exp(t / teacher_temp)^T (K x B, B = rows over all ranks): Q /= sum(Q); then
    ``n_iterations`` times {Q /= row sums (per prototype, all-reduced); Q /= K; Q /= column sums (per sample);
    Q /= B}; return (B * Q)^T. Computed in the log domain (logsumexp instead of sums of exp), which is the same in
    exact arithmetic but cannot over- or underflow for large logits or small temperatures; the initial division by
    sum(Q) is left out because the first row normalisation removes any global factor. Float32.
    """
    log_q = teacher_output.detach().float() / teacher_temp  # B x K (samples x prototypes)
    count = log_q.new_full((), float(log_q.shape[0]))  # a fill kernel, not a host-to-device copy
    if _distributed():
        dist.all_reduce(count)
    if log_q.shape[0] == 0:
        return log_q.clone()
    k = log_q.shape[1]
    log_b, log_k = torch.log(count), math.log(k)
    for _ in range(n_iterations):
        log_q = log_q - (_logsumexp_over_ranks(log_q) + log_k)  # each prototype's total mass -> 1/K
        log_q = log_q - (torch.logsumexp(log_q, dim=1, keepdim=True) + log_b)  # each sample's mass -> 1/B
    return torch.exp(log_q + log_b)


def _logsumexp_over_ranks(log_q: Tensor) -> Tensor:
    """(1, K) log of the column sums of exp(log_q) over the rows of every rank (max, then sum: all-reduced)."""
    peak = log_q.max(dim=0, keepdim=True).values
    if _distributed():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    sums = torch.exp(log_q - peak).sum(dim=0, keepdim=True)
    if _distributed():
        dist.all_reduce(sums)
    return peak + torch.log(sums)


# ----------------------------------------------------------------------------------------------------- masking
def block_mask(
    height: int,
    width: int,
    n_target: int,
    rng: random.Random,
    min_patches: int = 4,
    min_aspect: float = 0.3,
    max_patches: int | None = None,
) -> Tensor:
    """A (height, width) bool mask of about ``n_target`` patches made of random rectangular blocks (BEiT/iBOT/DINOv2
    block masking): each block has an area drawn in [min_patches, remaining] (at most ``max_patches``), a log-uniform
    aspect in [min_aspect, 1/min_aspect] and a random position; 10 attempts per block; it stops when no block adds
    new patches. Never masks more than ``n_target`` patches."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    count = 0
    lo, hi = math.log(min_aspect), math.log(1.0 / min_aspect)
    while count < n_target:
        budget = n_target - count
        if max_patches is not None:
            budget = min(budget, max_patches)
        added = 0
        for _ in range(10):
            area = rng.uniform(min_patches, budget)
            aspect = math.exp(rng.uniform(lo, hi))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < h < height and 0 < w < width:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= budget:
                    block.fill_(True)
                    added = new
                    break
        if added == 0:
            break
        count += added
    return mask


def mask_rng(seed: int, step: int, micro_batch: int, rank: int) -> random.Random:
    """The random stream of one rank's iBOT masks for one (micro-)batch, a function of ``(seed, step, micro_batch,
    rank)`` only: masks differ across ranks (DINOv2 seeds every rank with ``seed + rank``) and across steps, and a
    resumed run draws the same masks again without any saved state."""
    return random.Random(f"ibot-masks/{int(seed)}/{int(step)}/{int(micro_batch)}/{int(rank)}")


def seed_rank_streams(seed: int, rank: int) -> None:
    """Seed this process' torch (CPU and CUDA), ``random`` and numpy streams with ``seed + rank``, the official
    ``fix_random_seeds(seed + rank)`` of DINOv2's training setup: drop-path masks (and anything else drawn from
    the global streams) then differ across ranks instead of repeating rank 0's."""
    import numpy as np

    torch.manual_seed(seed + rank)
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)


class MaskBatch:
    """Masks of one batch of student global crops, made on the host (no device sync): ``masks`` (n, N) bool,
    ``index`` (M,) flat indices of the masked patches in ``tokens.flatten(0, 1)``, ``weights`` (M,) = 1 / (masked
    patches of that image), ``n_images`` = n."""

    def __init__(self, masks: Tensor) -> None:
        self.masks = masks
        self.n_images = masks.shape[0]
        flat = masks.flatten()
        self.index = flat.nonzero().flatten()
        per_image = masks.sum(dim=1).clamp(min=1).float()
        self.weights = (1.0 / per_image)[self.index // masks.shape[1]]

    def to(self, device: torch.device) -> MaskBatch:
        out = MaskBatch.__new__(MaskBatch)
        out.masks, out.n_images = self.masks.to(device, non_blocking=True), self.n_images
        out.index, out.weights = self.index.to(device, non_blocking=True), self.weights.to(device, non_blocking=True)
        return out


def block_masks(
    n_images: int,
    grid: tuple[int, int],
    probability: float = 0.5,
    ratio: Sequence[float] = (0.1, 0.5),
    rng: random.Random | None = None,
) -> MaskBatch:
    """DINOv2's masking of a batch: ``int(n_images * probability)`` images get a block mask, their mask ratios spread
    over ``ratio`` (image i draws from the i-th of equal sub-intervals), at most half the patches per block; the
    others none; the order is shuffled. ``grid`` = (patch rows, patch columns)."""
    rng = rng or random.Random()
    h, w = grid
    n = h * w
    n_masked = int(n_images * probability)
    edges = torch.linspace(float(ratio[0]), float(ratio[1]), n_masked + 1).tolist()
    masks = [
        block_mask(h, w, int(n * rng.uniform(edges[i], edges[i + 1])), rng, max_patches=int(0.5 * n)).flatten()
        for i in range(n_masked)
    ]
    masks += [torch.zeros(n, dtype=torch.bool) for _ in range(n_images - n_masked)]
    rng.shuffle(masks)
    return MaskBatch(torch.stack(masks) if masks else torch.zeros(0, n, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------- ViT tokens
def is_vit(backbone: nn.Module) -> bool:
    """A timm ViT-like model: a patch embedding, prefix tokens and ``forward_features`` / ``forward_head``."""
    return all(hasattr(backbone, a) for a in ("patch_embed", "num_prefix_tokens", "forward_features", "forward_head"))


@contextmanager
def _masked_patch_embedding(backbone: nn.Module, masks: Tensor, mask_token: Tensor):
    """While active, the patch embedding's output has the masked patches replaced by ``mask_token``."""

    def hook(module: nn.Module, inputs, output: Tensor) -> Tensor:
        m = masks.reshape(*output.shape[:-1], 1)  # (B, N, D) or NHWC (B, H, W, D) with dynamic_img_size
        return torch.where(m, mask_token.to(output.dtype).reshape(-1), output)

    handle = backbone.get_submodule("patch_embed").register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def vit_tokens(
    backbone: nn.Module, x: Tensor, masks: Tensor | None = None, mask_token: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """A timm ViT's ``(pooled, patch_tokens)`` for images ``x``: pooled = what ``backbone(x)`` returns (the CLS
    token for DINO's ViTs), patch tokens ``(B, N, D)`` after the final norm. With ``masks`` (B, N) the masked
    patches' embeddings are replaced by ``mask_token`` before the position embedding (iBOT)."""
    vit: Any = backbone  # duck-typed timm ViT (see is_vit): its methods are not nn.Module's
    if masks is not None:
        if mask_token is None:
            raise ValueError("vit_tokens: masks need a mask_token")
        with _masked_patch_embedding(backbone, masks, mask_token):
            tokens = vit.forward_features(x)
    else:
        tokens = vit.forward_features(x)
    return vit.forward_head(tokens, pre_logits=True), tokens[:, vit.num_prefix_tokens :]


def backbone_features(backbone: nn.Module, crops: Sequence[Tensor]) -> list[Tensor]:
    """``backbone`` over crops, one pass per run of consecutive same-size crops (as ``MultiCropWrapper``)."""
    features, start = [], 0
    while start < len(crops):
        end = start + 1
        while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
            end += 1
        features.append(backbone(torch.cat(list(crops[start:end]))))
        start = end
    return features


# ---------------------------------------------------------------------------------------------- iBOT patch loss
class IBOTPatchLoss(nn.Module):
    """Cross-entropy between the teacher's and the student's patch-token distributions at the masked patches.

    loss = -(1 / n_images) sum_{masked p} w_p sum_k t_pk log softmax(s_p / student_temp)_k, with w_p = 1 / (masked
    patches of p's image): each masked image counts once, whatever its mask size, and images without a mask count
    in n_images (DINOv2's ``forward_masked``). Teacher targets: softmax((t - center) / teacher_temp) with an EMA
    center of the masked teacher patch outputs (``centering="centering"``, updated once per optimizer step by
    :meth:`update_center`), or :func:`sinkhorn_knopp` (``"sinkhorn_knopp"``). The EMA centre moves towards the
    average over ranks of each rank's mean masked patch output, as the official ``reduce_center_update`` /
    ``apply_center_update`` (``all_reduce(sum of per-rank means) / world_size``), not the mean over all patches.
    """

    center: Tensor  # buffer (1, out_dim)

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "centering",
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        if centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"centering must be 'centering' or 'sinkhorn_knopp', got {centering!r}")
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.centering, self.sinkhorn_iterations = centering, sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._pending_sum: Tensor | None = None
        self._pending_count: Tensor | None = None

    @torch.no_grad()
    def teacher_targets(self, teacher_patch_output: Tensor, teacher_temp: float) -> Tensor:
        t = teacher_patch_output.detach().float()
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(t, teacher_temp, self.sinkhorn_iterations)
        if t.shape[0] > 0:  # (a host-side shape: no sync) this rank's mean, one term of the average over ranks
            s = t.mean(dim=0, keepdim=True)
            c = t.new_ones(())  # a fill kernel, not a host-to-device copy
            self._pending_sum = s if self._pending_sum is None else self._pending_sum + s
            self._pending_count = c if self._pending_count is None else self._pending_count + c
        return F.softmax((t - self.center) / teacher_temp, dim=-1)

    def forward(
        self,
        student_patch_output: Tensor,
        teacher_patch_output: Tensor,
        weights: Tensor,
        n_images: int,
        teacher_temp: float,
    ) -> Tensor:
        """``student_patch_output`` / ``teacher_patch_output``: (M, K) head outputs of the M masked patches."""
        targets = self.teacher_targets(teacher_patch_output, teacher_temp)
        log_p = F.log_softmax(student_patch_output.float() / self.student_temp, dim=-1)
        per_patch = -(targets * log_p).sum(dim=-1)
        return (per_patch * weights.to(per_patch.dtype)).sum() / max(int(n_images), 1)

    @torch.no_grad()
    def update_center(self) -> None:
        """center = m * center + (1 - m) * (average over ranks of each rank's mean masked teacher patch output since
        the last call; official DINOv2). A rank without masked patches (or without a call) does not count in the
        average; the official code would divide by the world size with a NaN mean there. No rank with any: the
        center stays."""
        if self._pending_sum is None or self._pending_count is None:  # (set together)
            if not _distributed():
                return
            # every rank joins the all-reduce, also one whose batch had no masked patch
            self._pending_sum, self._pending_count = self.center.new_zeros(self.center.shape), self.center.new_zeros(())
        stats = torch.cat([self._pending_sum.reshape(-1), self._pending_count.reshape(1)])
        if _distributed():
            dist.all_reduce(stats)
        mean = stats[:-1] / stats[-1].clamp(min=1.0)
        moved = (stats[-1] > 0).to(mean.dtype)  # no masked patch on any rank: the center stays (no host read)
        new = self.center * self.center_momentum + mean.reshape_as(self.center) * (1 - self.center_momentum)
        self.center.copy_(moved * new + (1 - moved) * self.center)
        self._pending_sum, self._pending_count = None, None

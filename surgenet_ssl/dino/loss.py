"""The DINO loss: cross-entropy between the sharpened, centred teacher and the student, over crop pairs."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from surgenet_ssl.dino.dinov2 import sinkhorn_knopp


class DINOLoss(nn.Module):
    """Cross-entropy H(teacher_i, student_j) averaged over all pairs (teacher global crop i, student crop j), i != j.

    The teacher distribution is softmax((t - center) / teacher_temp); the student's is softmax(s / student_temp).
    The center is an EMA of the mean teacher output over the *global* batch (all-reduced across ranks).

    Unlike the official code, the center is not updated inside ``forward``: teacher outputs are accumulated and
    ``update_center()`` is called once per optimizer step, so gradient accumulation does not update it twice.

    ``centering="sinkhorn_knopp"`` (DINOv2) replaces the centred softmax by Sinkhorn-Knopp normalised targets
    (:func:`surgenet_ssl.dino.dinov2.sinkhorn_knopp`, ``sinkhorn_iterations``) over all teacher rows of the step;
    the EMA center is then not used nor updated.
    """

    center: torch.Tensor  # buffer (1, out_dim)

    def __init__(
        self,
        out_dim: int,
        n_global_crops: int = 2,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "centering",
        sinkhorn_iterations: int = 3,
    ):
        super().__init__()
        if centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"dino.loss.centering must be 'centering' or 'sinkhorn_knopp', got {centering!r}")
        self.n_global_crops = n_global_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering, self.sinkhorn_iterations = centering, int(sinkhorn_iterations)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._pending_sum: torch.Tensor | None = None
        self._pending_count = 0

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """student_output: (n_crops * B, K); teacher_output: (n_global_crops * B, K), rows grouped crop by crop."""
        batch = teacher_output.shape[0] // self.n_global_crops
        if batch * self.n_global_crops != teacher_output.shape[0] or student_output.shape[0] % batch:
            raise ValueError(
                f"DINOLoss: teacher rows {teacher_output.shape[0]} / student rows {student_output.shape[0]} do not "
                f"split into {self.n_global_crops} global crops of the same batch size"
            )
        n_crops = student_output.shape[0] // batch
        student_logp = F.log_softmax(student_output.float() / self.student_temp, dim=-1).chunk(n_crops)
        teacher = teacher_output.detach().float()
        if self.centering == "sinkhorn_knopp":
            teacher_p = sinkhorn_knopp(teacher, teacher_temp, self.sinkhorn_iterations).chunk(self.n_global_crops)
        else:
            teacher_p = F.softmax((teacher - self.center) / teacher_temp, dim=-1).chunk(self.n_global_crops)

        total, pairs = student_output.new_zeros((), dtype=torch.float32), 0
        for i, t in enumerate(teacher_p):
            for j, s in enumerate(student_logp):
                if i == j:
                    continue  # same view for teacher and student: skipped
                total = total + torch.sum(-t * s, dim=-1).mean()
                pairs += 1
        if self.centering == "centering":
            self._accumulate(teacher)
        return total / pairs

    @torch.no_grad()
    def _accumulate(self, teacher: torch.Tensor) -> None:
        s = teacher.sum(dim=0, keepdim=True)
        self._pending_sum = s if self._pending_sum is None else self._pending_sum + s
        self._pending_count += teacher.shape[0]

    @torch.no_grad()
    def update_center(self) -> None:
        """center = m * center + (1 - m) * mean teacher output since the last call, over all ranks."""
        if self._pending_sum is None:
            return
        # new_full: a fill kernel with the count as its argument; new_tensor([count]) was a host-to-device copy
        count = self._pending_sum.new_full((1,), float(self._pending_count))
        stats = torch.cat([self._pending_sum.reshape(-1), count])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        batch_center = (stats[:-1] / stats[-1]).reshape_as(self.center)
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
        self._pending_sum, self._pending_count = None, 0

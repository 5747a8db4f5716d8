"""Once per optimizer step all ranks agree on two flags: "a rank's loss was not finite" and "a preemption signal
arrived". One all-reduce of two numbers carries both, so no rank ever waits for a peer that stopped alone.

Why pipelined on CUDA: reading the flags right away is a host sync in the middle of every step (the CPU waits for
the GPU to finish the backward pass before it can queue the optimizer step). On CUDA the flags of step k are
all-reduced and copied to pinned host memory asynchronously and read at step k+1, when they are long done; before
a checkpoint is written they are read at once (:meth:`StepAgreement.resolve`), so a checkpoint never holds the
weights of a step whose loss was not finite. Elsewhere (CPU, gloo) they are read at once, which costs nothing.

Plain PyTorch: the LightningModule calls :meth:`record_loss` in ``training_step``, :meth:`submit` before the
optimizer step and :meth:`resolve` when a checkpoint is about to be written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Agreement:
    """What all ranks agreed on for the optimizer step at ``where`` = (step, epoch, batch index)."""

    any_bad: bool
    stop: bool
    where: tuple[int, int, int]
    local_loss: str | None  # this rank's non-finite loss value, or None if it was finite here

    def message(self) -> str:
        step, epoch, batch_idx = self.where
        value = self.local_loss if self.local_loss is not None else "not finite on another rank"
        return (
            f"DINO loss is {value} at optimizer step {step} (epoch {epoch}, batch {batch_idx}); training stopped on "
            "every rank and the last good checkpoint is untouched. Usual fixes: lower dino.optimizer.base_lr, use "
            "trainer.precision=bf16-mixed instead of 16-mixed, or a lower dino.optimizer.clip_grad."
        )


@dataclass
class _Submitted:
    flags: torch.Tensor  # host copy (pinned on CUDA) of the all-reduced [any_bad, stop]
    event: torch.cuda.Event | None
    local_bad: torch.Tensor
    bad_loss: torch.Tensor
    where: tuple[int, int, int]


class StepAgreement:
    """Collects the losses of the micro-batches of an optimizer step and agrees on the flags across ranks.

    ``pipelined``: read each step's flags one step later (default: on CUDA only).
    """

    def __init__(self, pipelined: bool | None = None) -> None:
        self.pipelined = pipelined
        self._local_bad: torch.Tensor | None = None
        self._bad_loss: torch.Tensor | None = None
        self._where: tuple[int, int, int] | None = None
        self._pending: _Submitted | None = None

    def record_loss(self, loss: torch.Tensor, where: tuple[int, int, int]) -> None:
        """A micro-batch's loss (no host sync); ``where`` of the step's first micro-batch is kept for the message."""
        bad = ~torch.isfinite(loss.detach())
        if self._local_bad is None or self._bad_loss is None or self._local_bad.device != bad.device:  # (set together)
            self._local_bad, self._bad_loss = bad.clone(), loss.detach().clone()
        else:
            self._bad_loss = torch.where(self._local_bad, self._bad_loss, loss.detach())  # keep the first bad value
            self._local_bad |= bad
        self._where = self._where or where

    def submit(self, stop_requested: bool, where: tuple[int, int, int], device: torch.device) -> Agreement | None:
        """All-reduce this step's flags. Returns the agreement to act on now: this step's, or (pipelined) the
        previous step's, or None when there is nothing to read yet."""
        local_bad = self._local_bad if self._local_bad is not None else torch.zeros((), dtype=torch.bool, device=device)
        bad_loss = self._bad_loss if self._bad_loss is not None else torch.zeros((), device=local_bad.device)
        step_where = self._where or where
        self._local_bad, self._bad_loss, self._where = None, None, None
        flags = torch.stack([local_bad.float(), torch.full((), float(stop_requested), device=local_bad.device)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # NCCL: queued on the device, the host does not wait
        pipelined = self.pipelined if self.pipelined is not None else flags.device.type == "cuda"
        if not pipelined:
            return self._read(_Submitted(flags, None, local_bad, bad_loss, step_where))
        event = None
        if flags.device.type == "cuda":
            host = torch.empty(2, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = flags.clone()
        previous, self._pending = self._pending, _Submitted(host, event, local_bad, bad_loss, step_where)
        return self._read(previous) if previous is not None else None

    def resolve(self) -> Agreement | None:
        """Read the submitted flags not read yet (before a checkpoint is written, or at the end of training)."""
        pending, self._pending = self._pending, None
        return self._read(pending) if pending is not None else None

    @staticmethod
    def _read(sub: _Submitted) -> Agreement:
        if sub.event is not None:
            sub.event.synchronize()  # step k's flags, read at step k+1: done long ago
        any_bad, stop = sub.flags.tolist()
        local = None
        if any_bad and bool(sub.local_bad):  # only on the way to the error message
            local = f"{sub.bad_loss.item()}"
        return Agreement(bool(any_bad), bool(stop), sub.where, local)

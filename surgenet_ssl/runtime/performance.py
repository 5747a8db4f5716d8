"""Speed options of the training step (``performance.*``): torch.compile, channels_last, fused AdamW, cudnn.benchmark.

They change how fast a step runs, never what it computes (up to float rounding); each one falls back to the plain
path where the platform cannot do it, so a config stays valid on CPU, old GPUs and platforms without a compiler.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

log = logging.getLogger(__name__)

PERFORMANCE_DEFAULTS: dict[str, Any] = {
    "compile": False,  # torch.compile the student and teacher backbones
    "compile_mode": None,  # torch.compile mode: null (default), reduce-overhead, max-autotune, ...
    "compile_backend": "inductor",  # torch.compile backend; aot_eager: graph capture without code generation
    "channels_last": False,  # NHWC crops and backbone weights (tensor-core convolutions)
    "fused_adamw": True,  # the fused AdamW kernel where the parameters are on CUDA
    "cudnn_benchmark": True,  # let cuDNN pick the fastest convolution per shape (two crop sizes: tuned once)
}


def performance_options(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """The ``performance`` config with defaults filled in; unknown keys are an error (a typo must not be ignored)."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(PERFORMANCE_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown performance option(s) {unknown}; valid: {sorted(PERFORMANCE_DEFAULTS)}")
    return {**PERFORMANCE_DEFAULTS, **cfg}


def compile_with_fallback(module: nn.Module, name: str, **kwargs: Any) -> bool:
    """torch.compile ``module`` in place (like ``nn.Module.compile``: parameter names, state_dict keys and
    checkpoints stay the same). Compilation happens at the first call; where it fails (no compiler toolchain,
    an unsupported Python or operator), log a warning and run ``module`` eagerly from then on.

    The backward graph is compiled at its first ``backward()``, in Lightning's loop, outside this wrapper: so the
    first call with gradients of each new input shape (each shape is its own graph with ``dynamic=False``) also
    runs that backward once (``torch.autograd.grad``, nothing accumulated into ``.grad``) and falls back to eager
    when it fails. The cost: one extra backward per crop size, at the first step.

    Returns False when torch.compile could not even be set up (then ``module`` is left eager).
    """
    try:
        compiled = torch.compile(module._call_impl, **kwargs)
    except Exception as err:  # noqa: BLE001 - e.g. RuntimeError on a Python version dynamo does not support
        _warn_eager(name, err)
        return False
    state = {"worked": False}
    backward_checked: set[tuple] = set()

    def eager(err: BaseException, *args: Any, **kw: Any) -> Any:
        _warn_eager(name, err)
        module._compiled_call_impl = None
        return module._call_impl(*args, **kw)  # a real error of the input raises here again, unmasked

    def call(*args: Any, **kw: Any) -> Any:
        try:
            out = compiled(*args, **kw)
        except Exception as err:  # noqa: BLE001 - compile failures surface as many types
            if state["worked"] and not isinstance(err, torch._dynamo.exc.BackendCompilerFailed):
                raise  # the compiled module ran before: this is an error of the input, not of compilation
            return eager(err, *args, **kw)
        state["worked"] = True
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        if torch.is_grad_enabled() and shapes not in backward_checked:
            backward_checked.add(shapes)
            try:
                _run_backward_once(module, out)
            except Exception as err:  # noqa: BLE001 - the backward compiler's failures surface as many types
                return eager(err, *args, **kw)
        return out

    module._compiled_call_impl = call
    return True


def _run_backward_once(module: nn.Module, out: Any) -> None:
    """Gradients of ``out`` (summed) for ``module``'s trainable parameters, thrown away: compiles the backward."""
    outputs = out if isinstance(out, (tuple, list)) else [out]
    loss = [o.float().sum() for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad]
    params = [p for p in module.parameters() if p.requires_grad]
    if loss and params:
        torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


def _warn_eager(name: str, err: BaseException) -> None:
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    log.warning(
        "performance.compile: torch.compile of the %s is not supported here (%s: %s); it runs eagerly",
        name,
        type(err).__name__,
        first,
    )


def use_fused_adamw(enabled: bool, device: torch.device, precision: str) -> bool:
    """Fused AdamW only on CUDA and not with the fp16 gradient scaler: the fused kernel unscales inside ``step``,
    so Lightning would skip the unscaling that must happen before DINO's per-parameter clipping."""
    return bool(enabled) and device.type == "cuda" and str(precision) not in ("16-mixed", "16")


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """4-D tensors to NHWC memory layout (same values and shape); anything else unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


class AtenOpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while active (views included; ``counts``: op name -> calls). Why: on a GPU
    each op is at least one kernel launch paid in host time, and the count does not depend on the device, so it is
    measured on CPU tensors (scripts/bench_gpu_augment.py, scripts/gpu_report.py, the augmentation's op test)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func.overloadpacket.__name__)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

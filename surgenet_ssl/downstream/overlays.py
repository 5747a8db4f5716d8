"""Overlay PNG of segmentation predictions: per validation image the frame, the ground truth and the prediction,
coloured by class, with a legend. Drawn through matplotlib's Agg canvas (no pyplot, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from surgenet_ssl.runtime.io_utils import atomic_path

from .segmentation_data import CHOLECSEG8K_CLASSES, CHOLECSEG8K_COLORS

__all__ = ["class_palette", "save_overlays"]


def class_palette(class_names: Sequence[str]) -> np.ndarray:
    """``(C, 3)`` uint8 colours: CholecSeg8k's own colours for its classes, else matplotlib's tab10 / tab20."""
    if list(class_names) == list(CHOLECSEG8K_CLASSES):
        by_id = {cls: rgb for rgb, cls in CHOLECSEG8K_COLORS.items()}
        return np.array([by_id[i] for i in range(len(class_names))], dtype=np.uint8)
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(class_names) <= 10 else "tab20"]  # tab10: no two similar colours
    return np.array([[int(255 * c) for c in cmap(i % cmap.N)[:3]] for i in range(len(class_names))], dtype=np.uint8)


def _blend(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, ignore_index: int, alpha: float = 0.55):
    out = image.astype(np.float32).copy()
    valid = (labels >= 0) & (labels < len(palette)) & (labels != ignore_index)
    colours = palette[np.where(valid, labels, 0)].astype(np.float32)
    out[valid] = (1 - alpha) * out[valid] + alpha * colours[valid]
    return out.clip(0, 255).astype(np.uint8)


def save_overlays(
    path: str | Path,
    items: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, str]],
    class_names: Sequence[str],
    ignore_index: int = 255,
    title: str = "",
) -> Path:
    """``items``: (image HxWx3 uint8, ground truth HxW, prediction HxW, caption) -> one PNG (written atomically)."""
    path = Path(path)
    palette = class_palette(class_names)
    rows = max(1, len(items))
    fig = Figure(figsize=(9, 2.6 * rows + 0.8), dpi=100)
    FigureCanvasAgg(fig)
    for r, (image, gt, pred, caption) in enumerate(items):
        for c, (panel, name) in enumerate(
            (
                (image, "frame"),
                (_blend(image, gt, palette, ignore_index), "ground truth"),
                (_blend(image, pred, palette, ignore_index), "prediction"),
            )
        ):
            ax = fig.add_subplot(rows, 3, r * 3 + c + 1)
            ax.imshow(panel)
            ax.set_axis_off()
            ax.set_title(f"{name}: {caption}" if c == 0 else name, fontsize=8)
    handles = [Patch(color=palette[i] / 255.0, label=n) for i, n in enumerate(class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path

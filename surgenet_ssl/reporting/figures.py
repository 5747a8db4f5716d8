"""Report figures (matplotlib Agg canvas, no display): downstream metric vs pretraining frames, a rank chart of the
models across tasks, and a grid of each run's t-SNE map coloured by source."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["scaling_figure", "rank_figure", "tsne_grid", "ranks"]


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100)
    return path


def scaling_figure(rows: Sequence[dict], columns: Sequence[str], path: Path) -> Path | None:
    """One panel per metric: mean (+- std) vs pretraining frames (log axis), one line per backbone; random-init
    baselines as dashed horizontal lines. None when no model has both a frame count and a value."""
    panels = [c for c in columns if any(r.get("pretrain_frames") and r["values"].get(c) for r in rows)]
    if not panels:
        return None
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.6 * nrows))
    for k, column in enumerate(panels):
        ax = fig.add_subplot(nrows, cols, k + 1)
        by_backbone: dict[str, list] = {}
        for r in rows:
            value = r["values"].get(column)
            if value and value[0] is not None and r.get("pretrain_frames"):
                by_backbone.setdefault(r["backbone"], []).append((r["pretrain_frames"], value[0], value[1] or 0.0))
        for backbone, points in sorted(by_backbone.items()):
            points.sort()
            x, y, e = (np.array(v, dtype=float) for v in zip(*points, strict=True))
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=backbone)
        for r in rows:
            value = r["values"].get(column)
            if r["kind"] == "baseline" and value and value[0] is not None:
                ax.axhline(value[0], linestyle="--", linewidth=1, color="grey")
                ax.annotate(
                    f"random init ({r['backbone']})",
                    (0.01, value[0]),
                    xycoords=("axes fraction", "data"),
                    fontsize=7,
                    color="grey",
                    va="bottom",
                )
        ax.set_xscale("log")
        ax.set_xlabel("pretraining frames")
        ax.set_title(column, fontsize=9)
        ax.grid(alpha=0.3)
        if by_backbone:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def ranks(rows: Sequence[dict], columns: Sequence[str]) -> dict[str, dict[str, float]]:
    """column -> model -> rank (1 = best; ties share the mean rank) among the models that have a value."""
    out: dict[str, dict[str, float]] = {}
    for column in columns:
        scored = [
            (r["model"], r["values"][column][0])
            for r in rows
            if r["values"].get(column) and r["values"][column][0] is not None
        ]
        values = sorted({v for _, v in scored}, reverse=True)
        position: dict[float, float] = {}
        start = 1
        for v in values:
            count = sum(1 for _, x in scored if x == v)
            position[v] = start + (count - 1) / 2
            start += count
        out[column] = {m: position[v] for m, v in scored}
    return out


def rank_figure(rows: Sequence[dict], columns: Sequence[str], path: Path) -> Path | None:
    """Bump chart: the rank of every model on each metric (1 = best), one line per model."""
    table = ranks(rows, columns)
    columns = [c for c in columns if table.get(c)]
    models = [r["model"] for r in rows if any(r["model"] in table[c] for c in columns)]
    if len(models) < 2 or not columns:
        return None
    fig = Figure(figsize=(max(5.0, 1.6 * len(columns) + 3.5), 0.45 * len(models) + 2.2))
    ax = fig.add_subplot(1, 1, 1)
    for model in models:
        xs = [i for i, c in enumerate(columns) if model in table[c]]
        ax.plot(xs, [table[columns[i]][model] for i in xs], marker="o", label=model)
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns, rotation=20, ha="right", fontsize=8)
    ax.set_yticks(range(1, len(models) + 1))
    ax.invert_yaxis()
    ax.set_ylabel("rank (1 = best)")
    ax.set_title("Rank of each pretrained model per downstream metric", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def tsne_grid(maps: Sequence[tuple[str, Path]], path: Path) -> Path | None:
    """The runs' newest t-SNE maps (``embeddings/epochNNNN.png``, coloured by source) side by side."""
    maps = [(name, p) for name, p in maps if p is not None and Path(p).is_file()]
    if not maps:
        return None
    from matplotlib.image import imread

    cols = min(3, len(maps))
    nrows = math.ceil(len(maps) / cols)
    fig = Figure(figsize=(4.5 * cols, 4.2 * nrows))
    for k, (name, png) in enumerate(maps):
        ax = fig.add_subplot(nrows, cols, k + 1)
        ax.imshow(imread(str(png)))
        ax.set_axis_off()
        ax.set_title(f"{name} ({Path(png).stem})", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)

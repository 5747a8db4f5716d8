"""t-SNE map of (teacher) features coloured by label / source dataset, saved as a PNG (SurgeNet paper Fig. 3).

Why: clusters per source dataset or per label show at a glance whether the representation separates what it
should, long before downstream numbers exist. Features are L2-normalised first, so distances in the map follow
the cosine geometry the k-NN monitor uses. Plotting goes through matplotlib's Agg canvas directly (no pyplot,
no global backend switch), so it is safe in training processes without a display.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits

__all__ = ["tsne_embedding", "save_embedding_map", "clamp_perplexity"]

log = logging.getLogger(__name__)

_SMALL_SET = 1000  # points below which t-SNE runs single-threaded


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return x.double().numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x)


def clamp_perplexity(perplexity: float, n_points: int) -> float:
    """t-SNE needs perplexity < n_points; small sets (< 100 points) get at most (n - 1) / 3, and never < 1."""
    return float(max(1.0, min(perplexity, (n_points - 1) / 3.0)))


def tsne_embedding(features, perplexity: float = 30.0, seed: int = 0) -> np.ndarray:
    """2-D t-SNE coordinates ``(N, 2)`` of L2-normalised ``(N, D)`` features (tensor or array), N >= 2."""
    x = _to_numpy(features).astype(np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"t-SNE needs at least 2 feature vectors as an (N, D) matrix; got shape {x.shape}.")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    init = "pca" if x.shape[1] >= 2 else "random"
    tsne = TSNE(
        n_components=2,
        perplexity=clamp_perplexity(perplexity, x.shape[0]),
        init=init,
        learning_rate="auto",
        random_state=seed,
    )
    if x.shape[0] < _SMALL_SET:
        # small sets: threads only add overhead, and sklearn's OpenMP runtime competes with torch's (two libgomp
        # copies spin-waiting on the same cores made 5-point maps take seconds under load)
        with threadpool_limits(limits=1):
            return tsne.fit_transform(x)
    return tsne.fit_transform(x)


def _colors(n: int) -> list:
    import matplotlib

    if n <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = matplotlib.colormaps["tab20"]
        return [cmap(i) for i in range(n)]
    cmap = matplotlib.colormaps["gist_ncar"]
    return [cmap(i / n) for i in range(n)]


def save_embedding_map(
    features,
    labels,
    path: str | os.PathLike,
    label_names: Sequence[str] | None = None,
    title: str | None = None,
    perplexity: float = 30.0,
    max_points: int = 3000,
    seed: int = 0,
) -> Path:
    """t-SNE of ``features`` coloured by ``labels``, written as a PNG to ``path``; returns the path.

    Args:
        features: ``(N, D)`` tensor or array; labels: ``(N,)`` integer class indices.
        label_names: legend text per class index (default: the index).
        perplexity: clamped for small sets (see ``clamp_perplexity``).
        max_points: random subsample (seeded) above this many points, since t-SNE is slow on large sets.
    """
    x, y = _to_numpy(features), _to_numpy(labels).reshape(-1).astype(np.int64)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"embedding map needs (N, D) features and N labels; got {x.shape} and {y.shape}.")
    if x.shape[0] > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(x.shape[0], size=max_points, replace=False))
        log.info("Embedding map: t-SNE of a random %d of %d points.", max_points, x.shape[0])
        x, y = x[keep], y[keep]
    coords = tsne_embedding(x, perplexity=perplexity, seed=seed)

    classes = np.unique(y)
    colors = _colors(len(classes))
    fig = Figure(figsize=(8, 6.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    marker_size = float(np.clip(3000 / max(len(y), 1), 4, 40))
    for color, cls in zip(colors, classes, strict=True):
        sel = y == cls
        name = label_names[cls] if label_names is not None and 0 <= cls < len(label_names) else str(cls)
        ax.scatter(
            coords[sel, 0],
            coords[sel, 1],
            s=marker_size,
            color=color,
            label=f"{name} ({int(sel.sum())})",
            alpha=0.8,
            linewidths=0,
        )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"t-SNE of {len(y)} embeddings")
    ncol = 1 if len(classes) <= 20 else 2
    ax.legend(
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
        fontsize="small" if len(classes) <= 20 else "x-small",
        ncol=ncol,
        markerscale=max(1.0, 20 / marker_size),
        frameon=False,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path

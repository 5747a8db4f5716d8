"""Tiny labelled image folders for the evaluation tests (real PNG/JPEG files in tmp_path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLORS = {"blue": (30, 30, 200), "green": (30, 200, 30), "red": (200, 30, 30)}


def make_image_folder(root: Path, per_class: int, classes=COLORS, size: int = 32, seed: int = 0) -> Path:
    """``root/<class>/<i>.png``: noisy pictures of the class colour with an inverted stripe at a varying place."""
    rng = np.random.default_rng(seed)
    for name in classes:
        color = np.array(COLORS.get(name, (128, 128, 128)))
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.clip(color[None, None] + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            band = slice((i % 4) * size // 4, (i % 4 + 1) * size // 4)
            img[band] = 255 - img[band]
            Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root

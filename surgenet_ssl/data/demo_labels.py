"""Labelled demo data for downstream fine-tuning: instrument / tissue masks and per-segment surgical "phases".

The pretraining demo (:mod:`surgenet_ssl.data.demo`) renders synthetic procedures from tissue textures, endoscope
vignettes and instruments. This module renders *new* cases of the same three procedures with the same drawing
primitives (``_tissue``, ``_vignette``, ``_instrument``; the pretraining videos and shards are not touched) and
writes what a downstream task needs:

- **masks**: every instrument polygon / jaw / wrist is drawn a second time, with the same geometry, into a class-index
  mask, so the masks are pixel-exact: ``background`` (outside the endoscope vignette, console overlay),
  ``tissue``, and one class per instrument type (``grasper``, ``robotic_instrument``, ``stapler``);
- **phases**: each case is a sequence of segments, ``exposure`` (camera moves, no instrument), ``dissection``
  (instruments at work) and ``coagulation`` (instruments in surgical smoke), annotated Cholec80-style per rendered
  frame (``phases/annotations/<case>-phase.txt`` at 8 fps) and as CSVs (``phases/{train,val}.csv``).

Layout of ``<root>/demo_downstream`` (about 1.5 MB, a few seconds to generate, cached like the demo)::

    segmentation/classes.txt
    segmentation/{train,val}/images/<case>/<case>_<n>.jpg     frames at 2 fps (n counts them from 0)
    segmentation/{train,val}/masks/<case>/<case>_<n>.png      class-index PNGs
    phases/annotations/<case>-phase.txt                       "Frame<TAB>Phase", one row per 8-fps frame
    phases/{train,val}.csv                                    path,label,video (paths relative to the CSV)

Cases 1-3 of each procedure are the training split, case 4 the validation split (held-out cases, as in the
papers' splits by patient).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import cast

import numpy as np
from PIL import Image, ImageDraw

from surgenet_ssl.data import demo as D
from surgenet_ssl.runtime.io_utils import build_dir_once

__all__ = [
    "LABELS_VERSION",
    "LABELS_DIRNAME",
    "SEGMENTATION_CLASSES",
    "PHASES",
    "ensure_demo_labels",
    "render_labelled_case",
    "demo_labels_complete",
]

log = logging.getLogger(__name__)

LABELS_VERSION = 1  # bump when the labelled renderer changes: cached copies are rebuilt
LABELS_DIRNAME = "demo_downstream"
SEGMENTATION_CLASSES = ("background", "tissue", "grasper", "robotic_instrument", "stapler")
PHASES = ("exposure", "dissection", "coagulation")
INSTRUMENT_CLASS = {"grasper": 2, "robotic": 3, "stapler": 4}
CASES_PER_PROCEDURE = 4  # 1-3 train, 4 val
VAL_CASES = (4,)
SECONDS = 8
FRAMES_FPS = 2  # saved frames per second (annotations are per rendered frame, at D.VIDEO_FPS)
_BACKGROUND_BELOW = 0.35  # vignette gain under which a pixel counts as outside the endoscope view


class _MaskDraw:
    """Stands in for ``ImageDraw`` in ``demo._instrument``: the same shapes, filled with one class id."""

    def __init__(self, draw: ImageDraw.ImageDraw, value: int):
        self._draw, self._value = draw, value

    def polygon(self, xy, fill=None, **kwargs):
        self._draw.polygon(xy, fill=self._value)

    def line(self, xy, fill=None, width=0, **kwargs):
        self._draw.line(xy, fill=self._value, width=width)

    def ellipse(self, xy, fill=None, **kwargs):
        self._draw.ellipse(xy, fill=self._value)

    def rectangle(self, xy, fill=None, **kwargs):
        self._draw.rectangle(xy, fill=self._value)


def _phase_schedule(rng: np.random.Generator, n: int) -> list[str]:
    """exposure -> dissection -> coagulation -> dissection, with random lengths (each >= 1/8 of the case)."""
    order = ["exposure", "dissection", "coagulation", "dissection"]
    minimum = n // 8
    extra = rng.dirichlet(np.ones(len(order))) * (n - minimum * len(order))
    lengths = [minimum + int(e) for e in extra]
    lengths[-1] = n - sum(lengths[:-1])
    return [p for p, k in zip(order, lengths, strict=True) for _ in range(k)]


def render_labelled_case(procedure: str, case: int, seconds: int = SECONDS):
    """Frames (HxWx3 uint8), masks (HxW uint8 class ids) and the phase of each frame, at ``D.VIDEO_FPS``."""
    style = D.DEMO_PROCEDURES[procedure]
    rng = np.random.default_rng([LABELS_VERSION, 1000 + list(D.DEMO_PROCEDURES).index(procedure), case])
    w, h = D.WIDTH, D.HEIGHT
    big = D._tissue(style, rng, h * 2, w * 2)
    gain = D._vignette(style.vignette, rng)
    n = D.VIDEO_FPS * seconds
    phases = _phase_schedule(rng, n)
    offsets = rng.uniform(0, 2 * np.pi, 6)
    smoke = D._noise(rng, h * 2, w * 2, 40)
    instrument_class = INSTRUMENT_CLASS[style.instrument]
    frames, masks = [], []
    for f in range(n):
        t = f / D.VIDEO_FPS * style.speed
        ox = int((w / 2) * (1 + 0.9 * np.sin(0.23 * t + offsets[0])))
        oy = int((h / 2) * (1 + 0.9 * np.sin(0.19 * t + offsets[1])))
        view = Image.fromarray(big[oy : oy + h, ox : ox + w])
        mask = Image.new("L", (w, h), 1)  # tissue
        draw, mask_draw = ImageDraw.Draw(view), _MaskDraw(ImageDraw.Draw(mask), instrument_class)
        if phases[f] != "exposure":
            bottom, top = [(-10, h + 10), (w + 10, h + 10)], [(-10, -10), (w + 10, -10)]
            bases = top if style.instrument == "robotic" else bottom
            for k, b in enumerate(bases[: 1 if style.instrument == "stapler" else 2]):
                tip = (
                    w * (0.35 + 0.3 * k) + 40 * np.sin(0.9 * t + offsets[2 + k]),
                    h * 0.5 + 35 * np.cos(0.7 * t + offsets[4 + k]),
                )
                D._instrument(draw, style.instrument, b, tip, t + k)
                # demo._instrument is typed for ImageDraw; _MaskDraw draws the same shapes (duck-typed)
                D._instrument(cast(ImageDraw.ImageDraw, mask_draw), style.instrument, b, tip, t + k)
        if style.overlay:
            draw.rectangle((0, h - 14, w, h), fill=(15, 15, 20))
            draw.rectangle((8, h - 10, 8 + 40 + (f % 30), h - 4), fill=(40, 120, 200))
            ImageDraw.Draw(mask).rectangle((0, h - 14, w, h), fill=0)
        img: np.ndarray = np.asarray(view, dtype=np.float32)
        if style.haze:
            img = img * 0.8 + 255 * 0.2 * (0.5 + 0.5 * np.sin(0.5 * t + offsets[5]))
        if phases[f] == "coagulation":  # drifting surgical smoke
            sy, sx = (f * 3) % h, (f * 5) % w
            density = 0.25 + 0.5 * smoke[sy : sy + h, sx : sx + w, None]
            if style.overlay:  # the console overlay is not in the smoke
                density = density.copy()
                density[h - 14 :] = 0
            img = img * (1 - density) + 225 * density
        m = np.asarray(mask, dtype=np.uint8).copy()
        m[gain < _BACKGROUND_BELOW] = 0
        frames.append((img * gain[..., None]).clip(0, 255).astype(np.uint8))
        masks.append(m)
    return frames, masks, phases


def demo_labels_complete(directory: str | Path) -> bool:
    try:
        info = json.loads((Path(directory) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    # a new pretraining demo (its textures, instruments) means new labelled cases too
    return (
        info.get("version") == LABELS_VERSION
        and info.get("demo_version") == D.DEMO_VERSION
        and info.get("complete") is True
    )


def _build(tmp: Path) -> dict:
    seg, phases_dir = tmp / "segmentation", tmp / "phases"
    (phases_dir / "annotations").mkdir(parents=True)
    seg.mkdir(parents=True)
    (seg / "classes.txt").write_text("\n".join(SEGMENTATION_CLASSES) + "\n")
    step = D.VIDEO_FPS // FRAMES_FPS
    rows: dict[str, list[str]] = {"train": [], "val": []}
    counts = {"train": 0, "val": 0}
    for procedure in D.DEMO_PROCEDURES:
        for case in range(1, CASES_PER_PROCEDURE + 1):
            split = "val" if case in VAL_CASES else "train"
            name = f"{procedure}_case{case:02d}"
            frames, masks, phases = render_labelled_case(procedure, case)
            (phases_dir / "annotations" / f"{name}-phase.txt").write_text(
                "Frame\tPhase\n" + "".join(f"{i}\t{p}\n" for i, p in enumerate(phases))
            )
            img_dir, mask_dir = seg / split / "images" / name, seg / split / "masks" / name
            img_dir.mkdir(parents=True)
            mask_dir.mkdir(parents=True)
            for n, f in enumerate(range(0, len(frames), step)):
                stem = f"{name}_{n:03d}"
                Image.fromarray(frames[f]).save(img_dir / f"{stem}.jpg", quality=90)
                Image.fromarray(masks[f], mode="L").save(mask_dir / f"{stem}.png")
                rows[split].append(f"../segmentation/{split}/images/{name}/{stem}.jpg,{phases[f]},{name}")
                counts[split] += 1
    for split, lines in rows.items():
        (phases_dir / f"{split}.csv").write_text("path,label,video\n" + "\n".join(lines) + "\n")
    info = {
        "version": LABELS_VERSION,
        "demo_version": D.DEMO_VERSION,
        "complete": True,
        "classes": list(SEGMENTATION_CLASSES),
        "phases": list(PHASES),
        "frames": counts,
        "frames_fps": FRAMES_FPS,
        "annotation_fps": D.VIDEO_FPS,
        "description": "surgenet-ssl demo: labelled synthetic cases (masks, phases) for downstream fine-tuning",
    }
    (tmp / "manifest.json").write_text(json.dumps(info, indent=2))
    return info


def ensure_demo_labels(root: str | Path, timeout_s: float = 600.0) -> Path:
    """Return ``<root>/demo_downstream``, generating it first when missing or from an older version."""
    target = Path(root).expanduser() / LABELS_DIRNAME
    t0 = time.time()
    if build_dir_once(target, demo_labels_complete, _build, timeout_s):
        frames = json.loads((target / "manifest.json").read_text())["frames"]
        log.info("labelled demo data ready in %s: %s frames in %.1f s", target, frames, time.time() - t0)
    return target

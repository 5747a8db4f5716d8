"""Segmentation datasets: the generic ``images/`` + ``masks/`` layout and the CholecSeg8k layout.

Generic layout (``data.format=folder``)::

    DIR/images/[<case>/]<name>.jpg|png|...     frames; an optional first sub-folder names the video / case
    DIR/masks/[<case>/]<name>.png              class-index PNG (mode L or P; one value per pixel), 255 = ignore
    DIR/classes.txt (or DIR/../classes.txt)    one class name per line, in index order (or data.classes=[...])

CholecSeg8k layout (``data.format=cholecseg8k``), as released (17 videos, 8,080 frames, 13 classes)::

    DIR/videoNN/videoNN_<start>/frame_<i>_endo.png
                                frame_<i>_endo_watershed_mask.png   (grey values 50, 11, 21, ... -> class ids)
                                frame_<i>_endo_color_mask.png       (RGB colours -> class ids)

The watershed masks are used by default (``data.cholecseg8k_mask=color`` for the colour masks). The released masks
also contain a white 1-px edge and unlabelled pixels (watershed 255 / 0, colour white): both are ignored.

Bad input is an error naming the file: a missing mask, an image/mask size mismatch, a class id >= the number of
classes (or an unknown CholecSeg8k value), an unreadable file, an empty split.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from surgenet_ssl.evaluation.features import IMAGE_EXTENSIONS

__all__ = [
    "CHOLECSEG8K_CLASSES",
    "CHOLECSEG8K_WATERSHED",
    "CHOLECSEG8K_COLORS",
    "SegSample",
    "SegmentationDataset",
    "MaskReader",
    "folder_samples",
    "cholecseg8k_samples",
    "detect_segmentation_format",
    "read_class_names",
    "load_segmentation_split",
]

log = logging.getLogger(__name__)

CHOLECSEG8K_CLASSES = (
    "black_background",
    "abdominal_wall",
    "liver",
    "gastrointestinal_tract",
    "fat",
    "grasper",
    "connective_tissue",
    "blood",
    "cystic_duct",
    "l_hook_electrocautery",
    "gallbladder",
    "hepatic_vein",
    "liver_ligament",
)
# grey value of the watershed masks -> class id (the dataset's published table, written as "#505050" = 50,50,50)
CHOLECSEG8K_WATERSHED = {50: 0, 11: 1, 21: 2, 13: 3, 12: 4, 31: 5, 23: 6, 24: 7, 25: 8, 32: 9, 22: 10, 33: 11, 5: 12}
CHOLECSEG8K_COLORS = {
    (127, 127, 127): 0,
    (210, 140, 140): 1,
    (255, 114, 114): 2,
    (231, 70, 156): 3,
    (186, 183, 75): 4,
    (170, 255, 0): 5,
    (255, 85, 0): 6,
    (255, 0, 0): 7,
    (255, 255, 0): 8,
    (169, 255, 184): 9,
    (255, 160, 165): 10,
    (0, 50, 128): 11,
    (111, 74, 0): 12,
}
_CHOLECSEG8K_IGNORED_WATERSHED = (0, 255)
_CHOLECSEG8K_IGNORED_COLORS = ((255, 255, 255),)


@dataclass(frozen=True)
class SegSample:
    image: str
    mask: str
    key: str  # stable relative name (fractions hash it)
    group: str | None  # video / case


def _is_hidden(part: str) -> bool:
    return part.startswith(".")


def _images_under(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(_is_hidden(x) for x in p.relative_to(root).parts)
    )


def read_class_names(split_dir: Path, given: Sequence[str] | None = None) -> list[str]:
    """Class names in index order: ``given`` (data.classes), else ``classes.txt`` / ``classes.json`` in the split dir
    or its parent (shared by train and val)."""
    if given:
        return [str(c) for c in given]
    for folder in (split_dir, split_dir.parent):
        txt, js = folder / "classes.txt", folder / "classes.json"
        if txt.is_file():
            names = [line.strip() for line in txt.read_text().splitlines() if line.strip() and not line.startswith("#")]
            if names:
                return names
            raise ValueError(f"{txt} lists no class names (one name per line, in index order).")
        if js.is_file():
            data = json.loads(js.read_text())
            listed = data.get("classes") if isinstance(data, dict) else data
            if not isinstance(listed, list) or not listed:
                raise ValueError(f'{js} must hold a list of class names (or {{"classes": [...]}}).')
            return [str(n) for n in listed]
    raise ValueError(
        f"No class names for {split_dir}: put classes.txt (one name per line, in index order) in {split_dir} or "
        f"{split_dir.parent}, or pass data.classes=[name0,name1,...]."
    )


def folder_samples(split_dir: str | os.PathLike) -> list[SegSample]:
    """Pairs of the generic layout; raises naming the first image without a mask."""
    root = Path(split_dir).expanduser()
    images_dir, masks_dir = root / "images", root / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise FileNotFoundError(
                f"{d} not found: the segmentation layout is DIR/images/<frames> + "
                "DIR/masks/<class-index PNGs with the same names>."
            )
    masks = {p.relative_to(masks_dir).with_suffix("").as_posix(): p for p in _images_under(masks_dir)}
    samples = []
    for image in _images_under(images_dir):
        rel = image.relative_to(images_dir)
        stem = rel.with_suffix("").as_posix()
        mask = masks.pop(stem, None)
        if mask is None:
            raise ValueError(f"{image} has no mask: expected {masks_dir / rel.with_suffix('.png')}.")
        group = rel.parts[0] if len(rel.parts) > 1 else None
        samples.append(SegSample(str(image), str(mask), stem, group))
    if masks:
        log.warning(
            "%d mask(s) in %s have no image and are ignored, e.g. %s", len(masks), masks_dir, next(iter(masks.values()))
        )
    if not samples:
        raise ValueError(f"Empty split: no images in {images_dir}.")
    return samples


def cholecseg8k_samples(root: str | os.PathLike, mask_kind: str = "watershed") -> list[SegSample]:
    """Frames ``*_endo.png`` of a CholecSeg8k tree with their watershed (or colour) masks; group = ``videoNN``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"CholecSeg8k folder not found: {root}")
    if mask_kind not in ("watershed", "color"):
        raise ValueError(f"data.cholecseg8k_mask must be watershed or color, got {mask_kind!r}")
    samples = []
    for image in sorted(root.rglob("*_endo.png")):
        mask = image.with_name(f"{image.stem}_{mask_kind}_mask.png")
        if not mask.is_file():
            raise ValueError(f"{image} has no {mask_kind} mask: expected {mask}.")
        rel = image.relative_to(root)
        samples.append(
            SegSample(
                str(image), str(mask), rel.with_suffix("").as_posix(), rel.parts[0] if len(rel.parts) > 1 else None
            )
        )
    if not samples:
        raise ValueError(f"Empty split: no CholecSeg8k frames (*_endo.png) under {root}.")
    return samples


def detect_segmentation_format(split_dir: str | os.PathLike) -> str:
    root = Path(split_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Segmentation data not found: {root}")
    if (root / "images").is_dir():
        return "folder"
    if next(root.rglob("*_endo.png"), None) is not None:
        return "cholecseg8k"
    raise ValueError(
        f"Cannot tell the layout of {root}: expected images/ + masks/ (generic) or CholecSeg8k "
        "folders (videoNN/.../frame_N_endo.png); set data.format=folder|cholecseg8k."
    )


class MaskReader:
    """Reads one mask file into an int64 HxW array of class ids (``ignore_index`` where unlabelled) and checks it."""

    def __init__(self, kind: str, num_classes: int, ignore_index: int = 255):
        if kind not in ("index", "watershed", "color"):
            raise ValueError(f"unknown mask kind {kind!r}")
        self.kind, self.num_classes, self.ignore_index = kind, num_classes, ignore_index
        if kind == "watershed":
            lut = np.full(256, -1, dtype=np.int64)
            for value, cls in CHOLECSEG8K_WATERSHED.items():
                lut[value] = cls
            lut[list(_CHOLECSEG8K_IGNORED_WATERSHED)] = ignore_index
            self._lut = lut

    def __call__(self, path: str) -> np.ndarray:
        try:
            with Image.open(path) as img:
                img.load()
                mode = img.mode
                arr = np.asarray(img)
        except Exception as err:  # PIL: UnidentifiedImageError, OSError (truncated), ...
            raise ValueError(f"Cannot read mask {path}: {type(err).__name__}: {err}") from err
        if self.kind == "color":
            return self._from_colors(arr, path)
        if arr.ndim == 3:
            r, g, b = (arr[..., k] for k in range(3)) if arr.shape[2] >= 3 else (arr[..., 0], None, None)
            if g is not None and b is not None and np.array_equal(r, g) and np.array_equal(r, b):  # grey as RGB
                arr = arr[..., 0]
            else:
                raise ValueError(
                    f"Mask {path} is a colour image (mode {mode}); expected a class-index PNG (mode L or P, one class "
                    "id per pixel). Convert colour masks to class ids first."
                )
        if self.kind == "watershed":
            mapped = self._lut[arr.astype(np.int64).clip(0, 255)]
            bad = np.unique(arr[mapped < 0])
            if bad.size:
                raise ValueError(
                    f"Mask {path} has grey value(s) {bad.tolist()[:10]} that are not CholecSeg8k watershed classes "
                    f"(known: {sorted(CHOLECSEG8K_WATERSHED)}; 0/255 = ignored)."
                )
            return mapped
        ids = arr.astype(np.int64)
        bad = np.unique(ids[(ids != self.ignore_index) & ((ids < 0) | (ids >= self.num_classes))])
        if bad.size:
            raise ValueError(
                f"Mask {path} has class id(s) {bad.tolist()[:10]} out of range: {self.num_classes} "
                f"classes (0..{self.num_classes - 1}, {self.ignore_index} = ignore)."
            )
        return ids

    def _from_colors(self, arr: np.ndarray, path: str) -> np.ndarray:
        if arr.ndim != 3 or arr.shape[2] < 3:
            raise ValueError(f"Colour mask {path} is not an RGB image.")
        rgb = arr[..., :3].astype(np.int64)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        out = np.full(code.shape, -1, dtype=np.int64)
        for (r, g, b), cls in CHOLECSEG8K_COLORS.items():
            out[code == ((r << 16) | (g << 8) | b)] = cls
        for r, g, b in _CHOLECSEG8K_IGNORED_COLORS:
            out[code == ((r << 16) | (g << 8) | b)] = self.ignore_index
        if (out < 0).any():
            bad = np.unique(code[out < 0])[:5]
            colours = [((int(c) >> 16) & 255, (int(c) >> 8) & 255, int(c) & 255) for c in bad]
            raise ValueError(f"Colour mask {path} has colour(s) {colours} that are not CholecSeg8k classes.")
        return out


def read_rgb(path: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as err:
        raise ValueError(f"Cannot read image {path}: {type(err).__name__}: {err}") from err


class SegmentationDataset(Dataset):
    """``(image tensor, mask tensor, index)``; geometry checked on every read (the error names both files)."""

    def __init__(
        self,
        samples: Sequence[SegSample],
        classes: Sequence[str],
        reader: MaskReader,
        transform: Callable,
        root: str = "",
    ):
        self.samples = list(samples)
        self.classes = list(classes)
        self.reader = reader
        self.transform = transform
        self.root = root

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.samples[i]
        image = read_rgb(s.image)
        mask = self.reader(s.mask)
        if image.shape[:2] != mask.shape[:2]:
            raise ValueError(
                f"Image/mask size mismatch: {s.image} is {image.shape[1]}x{image.shape[0]} but {s.mask} "
                f"is {mask.shape[1]}x{mask.shape[0]} (width x height)."
            )
        return image, mask

    def __getitem__(self, i: int):
        image, mask = self.load(i)
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))  # seeded by torch (DataLoader workers)
        x, y = self.transform(image, mask, rng)
        return x, y, i

    def validate(self) -> dict[str, int]:
        """Read every mask and image header now (bad input fails before training); returns pixel counts per class."""
        counts = np.zeros(len(self.classes) + 1, dtype=np.int64)
        for s in self.samples:
            mask = self.reader(s.mask)
            try:
                with Image.open(s.image) as img:
                    w, h = img.size
            except Exception as err:
                raise ValueError(f"Cannot read image {s.image}: {type(err).__name__}: {err}") from err
            if (h, w) != mask.shape[:2]:
                raise ValueError(
                    f"Image/mask size mismatch: {s.image} is {w}x{h} but {s.mask} is "
                    f"{mask.shape[1]}x{mask.shape[0]} (width x height)."
                )
            ids = np.where(mask == self.reader.ignore_index, len(self.classes), mask)
            counts += np.bincount(ids.reshape(-1), minlength=len(counts))
        return {name: int(c) for name, c in zip([*self.classes, "<ignored>"], counts, strict=True)}


def load_segmentation_split(split_dir: str, fmt: str, classes: Sequence[str] | None, mask_kind: str = "watershed"):
    """``(samples, class names, MaskReader kind)`` for one split directory."""
    fmt = detect_segmentation_format(split_dir) if fmt == "auto" else fmt
    if fmt == "folder":
        return folder_samples(split_dir), read_class_names(Path(split_dir).expanduser(), classes), "index", fmt
    if fmt == "cholecseg8k":
        if classes and list(classes) != list(CHOLECSEG8K_CLASSES):
            log.warning("data.classes is ignored for CholecSeg8k (its 13 classes are fixed)")
        return cholecseg8k_samples(split_dir, mask_kind), list(CHOLECSEG8K_CLASSES), mask_kind, fmt
    if fmt == "endoscapes_seg":
        from .endoscapes import seg_samples

        samples, names = seg_samples(split_dir)
        if classes and list(classes) != names:
            log.warning("data.classes is ignored for Endoscapes-Seg50 (its classes come from seg_label_map.txt)")
        return samples, names, "index", fmt
    raise ValueError(f"data.format={fmt} is not a segmentation layout (auto, folder, cholecseg8k, endoscapes_seg)")

"""Labelled image folders (one subfolder per class) -> frozen backbone features, with counted skips.

Why not torchvision's ImageFolder: it crashes deep inside a DataLoader worker on the first undecodable image
and errors on empty class folders without saying what to do. Here bad input is either a clear error up front
(missing folder, fewer than 2 usable classes, unknown validation classes) or skipped *and counted*: empty
class folders and non-image files when the folder is scanned, undecodable images while features are extracted
(the dataset returns a flag instead of raising, so this works with any number of workers).

Preprocessing is DINO's evaluation transform: resize the short side to image_size * 256/224 (bicubic),
center-crop image_size, ImageNet mean/std.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderDataset",
    "ExtractedFeatures",
    "eval_transform",
    "extract_features",
    "resolve_device",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' / None -> cuda when available, else cpu; anything else is passed to ``torch.device``."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device} was requested but CUDA is not available here; use device=auto or cpu.")
    return resolved


def eval_transform(image_size: int = 224, resize_size: int | None = None) -> transforms.Compose:
    """Resize short side to ``resize_size`` (default ``round(image_size * 256 / 224)``), center-crop, normalise."""
    resize_size = resize_size or round(image_size * 256 / 224)
    if resize_size < image_size:
        raise ValueError(f"resize_size ({resize_size}) must be >= image_size ({image_size}) for the center crop.")
    return transforms.Compose(
        [
            transforms.Resize(resize_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def _is_hidden(path: Path | str) -> bool:
    """Dot-files and dot-folders (.DS_Store, .ipynb_checkpoints, ...) are not data."""
    return (path.name if isinstance(path, Path) else path).startswith(".")


class ImageFolderDataset(Dataset):
    """``root/<class>/**/<image>`` -> ``(image_tensor, label, ok)``; ``ok`` is False for undecodable files.

    Args:
        root: folder with one subfolder per class (subfolders are searched recursively, sorted).
        image_size / resize_size: see ``eval_transform``.
        classes: class names fixing the label indices (pass the training set's ``classes`` for the validation
            set so both share indices). ``None``: the sorted non-empty subfolders of ``root``.
        min_classes: raise when fewer usable classes are found (2 for k-NN / linear probe on a training set).

    Attributes: ``classes``, ``samples`` (list of ``(path, label)``), ``empty_classes`` (skipped folder names),
    ``ignored_files`` (number of non-image files and files outside class folders, not loaded).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int = 224,
        resize_size: int | None = None,
        classes: Sequence[str] | None = None,
        min_classes: int = 2,
    ):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"Image folder not found: {self.root}. Expected a directory with one subfolder per class "
                "(e.g. DIR/class_a/img1.jpg, DIR/class_b/img2.jpg)."
            )
        self.transform = eval_transform(image_size, resize_size)
        self.image_size = image_size
        self.ignored_files = 0
        folders = sorted(p for p in self.root.iterdir() if p.is_dir() and not _is_hidden(p))
        self.ignored_files += sum(1 for p in self.root.iterdir() if p.is_file() and not _is_hidden(p))
        if not folders:
            raise ValueError(
                f"No class subfolders in {self.root}. Put the images of each class into their own subfolder "
                "(e.g. DIR/class_a/img1.jpg, DIR/class_b/img2.jpg)."
            )
        found: dict[str, list[Path]] = {}
        self.empty_classes: list[str] = []
        for folder in folders:
            files = sorted(
                p
                for p in folder.rglob("*")
                if p.is_file() and not any(_is_hidden(part) for part in p.relative_to(folder).parts)
            )
            images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
            self.ignored_files += len(files) - len(images)
            if images:
                found[folder.name] = images
            else:
                self.empty_classes.append(folder.name)
        if self.empty_classes:
            log.warning(
                "Skipping %d empty class folder(s) in %s (no %s files): %s",
                len(self.empty_classes),
                self.root,
                "/".join(IMAGE_EXTENSIONS),
                ", ".join(self.empty_classes),
            )
        if self.ignored_files:
            log.warning(
                "Ignoring %d non-image file(s) (or files outside class folders) in %s.", self.ignored_files, self.root
            )

        if classes is None:
            self.classes = sorted(found)
        else:
            self.classes = list(classes)
            unknown = sorted(set(found) - set(self.classes))
            if unknown:
                raise ValueError(
                    f"{self.root} has class folder(s) {unknown} that are not among the training classes "
                    f"{self.classes}. Use the same class subfolder names in the training and validation folders."
                )
        if len(found) < min_classes:
            if not found:
                detail = "no class folder contains images"
            else:
                detail = f"only {len(found)} class folder(s) with images: {sorted(found)}"
            empty = f"; empty folders skipped: {self.empty_classes}" if self.empty_classes else ""
            raise ValueError(
                f"{self.root}: {detail}{empty}. Classification needs at least {min_classes} classes: add a "
                "subfolder with images for each class."
            )
        index = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = [
            (str(path), index[name]) for name in sorted(found, key=index.__getitem__) for path in found[name]
        ]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int, bool]:
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                image = self.transform(img.convert("RGB"))
            return image, label, True
        except Exception as err:  # PIL raises UnidentifiedImageError, OSError (truncated), ValueError, ...
            log.debug("Cannot decode %s: %s", path, err)
            return torch.zeros(3, self.image_size, self.image_size), label, False


@dataclass
class ExtractedFeatures:
    """Features of the decodable images of an ``ImageFolderDataset`` (rows aligned with ``labels``/``paths``)."""

    features: Tensor  # (N, D) float32 on CPU
    labels: Tensor  # (N,) long
    paths: list[str]
    classes: list[str]
    failed: list[str] = field(default_factory=list)  # undecodable images, skipped


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: ImageFolderDataset,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device | None = "auto",
) -> ExtractedFeatures:
    """Run ``model`` (a backbone returning pooled ``(B, D)`` features) in eval mode over ``dataset``.

    ``device``: 'auto' (cuda when available), an explicit device (the model is moved there), or ``None``: the
    device the model's parameters are on (no move; what a training callback wants for the teacher).
    The model's train/eval mode is restored afterwards. Undecodable images are dropped, counted in ``failed``
    and logged as one warning. Raises when none decodes.
    """
    if len(dataset) == 0:
        raise ValueError(f"No images to extract features from in {dataset.root}.")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    else:
        device = resolve_device(device)
        model = model.to(device)
    was_training = model.training
    model.eval()
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda"
    )
    feats, labels, oks = [], [], []
    try:
        for images, y, ok in loader:
            out = model(images.to(device, non_blocking=True))
            if not isinstance(out, Tensor) or out.ndim != 2:
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(
                    f"The backbone returned {shape}, not pooled (batch, dim) features. Build it with num_classes=0 "
                    "(build_backbone does), not features_only."
                )
            feats.append(out.float().cpu())
            labels.append(y)
            oks.append(ok)
    finally:
        model.train(was_training)
    features, label_t, ok_t = torch.cat(feats), torch.cat(labels).long(), torch.cat(oks).bool()
    paths = [p for p, _ in dataset.samples]
    failed = [p for p, good in zip(paths, ok_t.tolist(), strict=True) if not good]
    if failed:
        log.warning(
            "Skipped %d undecodable image(s) of %d in %s, e.g. %s",
            len(failed),
            len(paths),
            dataset.root,
            ", ".join(failed[:3]),
        )
    if not ok_t.any():
        raise ValueError(f"None of the {len(paths)} images in {dataset.root} could be decoded.")
    keep = ok_t.nonzero().flatten()
    return ExtractedFeatures(
        features=features[keep],
        labels=label_t[keep],
        paths=[paths[i] for i in keep.tolist()],
        classes=list(dataset.classes),
        failed=failed,
    )

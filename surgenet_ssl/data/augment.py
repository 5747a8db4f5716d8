"""Multi-crop augmentation of the DINO recipe (2 global + N local crops per frame).

Each crop: random resized crop (bicubic) -> horizontal flip p=0.5 -> colour jitter (0.4, 0.4, 0.2, 0.1) with p=0.8
-> grayscale p=0.2 -> Gaussian blur sigma~U(0.1, 2) (global 1: always, global 2: p=0.1, locals: p=0.5)
-> solarize at 128 (global 2 only, p=0.2) -> ImageNet normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomGaussianBlur:
    """PIL Gaussian blur with probability ``p`` and sigma drawn uniformly from ``(sigma_min, sigma_max)``."""

    def __init__(self, p: float, sigma_min: float = 0.1, sigma_max: float = 2.0) -> None:
        self.p, self.sigma_min, self.sigma_max = p, sigma_min, sigma_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(()) >= self.p:
            return img
        sigma = self.sigma_min + float(torch.rand(())) * (self.sigma_max - self.sigma_min)
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))


class RandomSolarize:
    """Solarize (invert pixels >= threshold) with probability ``p``."""

    def __init__(self, p: float, threshold: int = 128) -> None:
        self.p, self.threshold = p, threshold

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, self.threshold) if torch.rand(()) < self.p else img


class MultiCropAugmentation:
    """PIL image -> list of normalised crop tensors: ``[global_1, global_2, local_1, ..., local_N]``.

    Sizes, scales and the number of local crops come from the config (``dino.crops``); defaults are the recipe's.
    """

    def __init__(
        self,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        global_crops_scale: Sequence[float] = (0.4, 1.0),
        local_crops_scale: Sequence[float] = (0.05, 0.4),
        local_crops_number: int = 8,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}")
        self.local_crops_number = local_crops_number
        flip_and_jitter = T.Compose(
            [
                T.RandomHorizontalFlip(p=0.5),
                T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
            ]
        )
        normalize = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
        bicubic = T.InterpolationMode.BICUBIC

        def crop(size: int, scale: Sequence[float]) -> T.RandomResizedCrop:
            return T.RandomResizedCrop(size, scale=tuple(scale), interpolation=bicubic)

        self.global_1 = T.Compose(
            [crop(global_crops_size, global_crops_scale), flip_and_jitter, RandomGaussianBlur(1.0), normalize]
        )
        self.global_2 = T.Compose(
            [
                crop(global_crops_size, global_crops_scale),
                flip_and_jitter,
                RandomGaussianBlur(0.1),
                RandomSolarize(0.2),
                normalize,
            ]
        )
        self.local = T.Compose(
            [crop(local_crops_size, local_crops_scale), flip_and_jitter, RandomGaussianBlur(0.5), normalize]
        )

    @property
    def n_crops(self) -> int:
        return 2 + self.local_crops_number

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        if image.mode != "RGB":
            image = image.convert("RGB")
        crops = [self.global_1(image), self.global_2(image)]
        crops.extend(self.local(image) for _ in range(self.local_crops_number))
        return crops

"""``data.decode=gpu`` (with ``data.augment_on=gpu``): loader workers ship JPEG bytes, the training device decodes.

Worker side, :class:`JpegBytes`: read a frame's JPEG member, check its header (a JPEG start-of-image and frame
header, at most ``data.max_image_pixels``, an end-of-image marker: what can be checked without decoding) and ship
the bytes as a 1-D uint8 tensor. A frame that fails the check is corrupt for the loader: logged, counted
(``data/corrupt_images``) and replaced as on the CPU path (``sampling=epoch``: a frame of the same source drawn
from (seed, epoch, position), so a resumed run makes the same batches). No pixel work in the workers.

Device side, :func:`decode_to_canvas`: torchvision's batched ``decode_jpeg(list, device=...)`` (nvJPEG on CUDA;
libjpeg-turbo on CPU, so the tests run the same code), then each frame fitted into the GPU-mode canvas exactly as
:class:`~surgenet_ssl.data.augment.FrameResize` fits it in the workers (no resize for a frame that fits up to one
odd pixel per side; otherwise an area downscale, aspect kept; zero padding), giving the ``frames`` / ``frame_hw``
batch the GPU augmentation takes. A frame the header check let through but the decoder rejects (damage inside the
entropy-coded data) is found by decoding the batch's frames one by one, counted as ``corrupt_images`` and replaced
by the batch's next good frame (a copy): every rank keeps its fixed batch size (DDP), and the batch keys list the
frame that was replaced. A batch with no decodable frame at all raises.

Why torchvision and not TorchCodec: TorchCodec is not installed (not a dependency of this project), and
torchvision 0.29 (installed, built for the installed torch) still ships the batched nvJPEG decoder. Its image
decoding is marked deprecated in 0.29 in favour of TorchCodec; the call is isolated in :func:`_decode_batch` so that
moving to ``torchcodec.decoders.decode_jpeg`` is one function.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from surgenet_ssl.data.augment import GPU_FRAME_SIZE, FrameResize, FrameTransform
from surgenet_ssl.data.decode import jpeg_info

log = logging.getLogger(__name__)

DECODE_MODES = ("cpu", "gpu")


class JpegBytes(FrameTransform):
    """Worker transform of ``data.decode=gpu``: the frame's JPEG bytes, header-checked, as a uint8 tensor. The
    loader batches them as ``batch["jpeg"]`` (a list of 1-D tensors) with ``batch["canvas_hw"]``."""

    backend = "gpu-decode"
    batch_key = "jpeg"
    batch_keys = ("jpeg",)

    def __init__(
        self,
        frame_size: Sequence[int] = GPU_FRAME_SIZE,
        global_crops_size: int = 224,
        max_image_pixels: int = 64_000_000,
    ) -> None:
        super().__init__()
        self.fit = FrameResize(frame_size, global_crops_size)  # the canvas fitting the device reuses
        self.frame_size = self.fit.frame_size
        self.max_image_pixels = int(max_image_pixels)

    def decode(self, data: bytes) -> np.ndarray:
        """Header check only (raises ValueError for what the CPU path's decoder would refuse up front)."""
        info = jpeg_info(data)
        if info is None:
            raise ValueError("not a JPEG (or no frame header); data.decode=gpu decodes JPEG only")
        h, w, components = info
        if h < 1 or w < 1 or components not in (1, 3, 4):
            raise ValueError(f"JPEG header: {h}x{w}, {components} components")
        if self.max_image_pixels and h * w > self.max_image_pixels:
            raise ValueError(f"{h}x{w} pixels is over data.max_image_pixels={self.max_image_pixels}")
        if data.rstrip(b"\0")[-2:] != b"\xff\xd9":
            raise ValueError("truncated JPEG (no end-of-image marker)")
        return np.frombuffer(data, dtype=np.uint8)

    def __call__(self, image: Any) -> torch.Tensor:
        if isinstance(image, (bytes, bytearray, memoryview)):
            image = self.decode(bytes(image))
        return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))


def _decode_batch(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (UserWarning, DeprecationWarning, FutureWarning))  # the 0.29 deprecation
        out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def fit_frame(frame: torch.Tensor, fit: FrameResize) -> tuple[torch.Tensor, tuple[int, int]]:
    """(3, h, w) uint8 on any device -> the ``(nh, nw)`` region it gets in the canvas, as FrameResize does it."""
    h, w = int(frame.shape[-2]), int(frame.shape[-1])
    nh, nw = fit.fitted_size(h, w)
    if fit.fits(h, w):
        return frame[:, :nh, :nw], (nh, nw)
    x = F.interpolate(frame[None].float(), size=(nh, nw), mode="area")[0]
    return x.round_().clamp_(0, 255).to(torch.uint8), (nh, nw)


def decode_to_canvas(
    jpeg: Sequence[torch.Tensor],
    canvas_hw: Sequence[int],
    device: torch.device | str,
    keys: list[str] | None = None,
    count: Callable[[str, int], Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a batch of JPEG byte tensors (on the host) on ``device`` and fit them into a ``canvas_hw`` canvas:
    ``(frames uint8 (B, 3, H, W), frame_hw int32 (B, 2))`` on ``device``, what GPU mode's loader would ship.
    Corrupt frames are counted through ``count("corrupt_images", n)`` and replaced by the next good frame."""
    device = torch.device(device)
    data = [t if t.device.type == "cpu" else t.cpu() for t in jpeg]
    fit = FrameResize((int(canvas_hw[0]), int(canvas_hw[1])))
    try:
        decoded: list[torch.Tensor | None] = list(_decode_batch(data, device))
    except RuntimeError:  # one bad frame fails the whole call: find it
        decoded = []
        for i, d in enumerate(data):
            try:
                decoded.append(_decode_batch([d], device)[0])
            except RuntimeError as e:
                name = keys[i] if keys is not None and i < len(keys) else f"#{i}"
                log.warning("corrupt image %s (device decode: %s); replaced by another frame of the batch", name, e)
                decoded.append(None)
    bad = [i for i, d in enumerate(decoded) if d is None]
    if bad:
        good = [i for i, d in enumerate(decoded) if d is not None]
        if not good:
            raise RuntimeError(f"data.decode=gpu: none of the {len(data)} frames of a batch could be decoded")
        for i in bad:
            decoded[i] = decoded[next((g for g in good if g > i), good[0])]
            if keys is not None and i < len(keys):
                keys[i] = f"{keys[i]} (corrupt, replaced)"
        if count is not None:
            count("corrupt_images", len(bad))
    fh, fw = fit.frame_size
    frames = torch.zeros((len(decoded), 3, fh, fw), dtype=torch.uint8, device=device)
    sizes = torch.empty((len(decoded), 2), dtype=torch.int32)
    for i, one in enumerate(decoded):
        assert one is not None
        region, (nh, nw) = fit_frame(one, fit)
        frames[i, :, :nh, :nw] = region
        sizes[i, 0], sizes[i, 1] = nh, nw
    return frames, sizes.to(device, non_blocking=True)

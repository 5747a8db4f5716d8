"""Temporal positives (issue 25 item 4): the second global crop from a neighbouring frame of the same video, within
the window, with the configured probability, the same after a resume; off by default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data.curation_media import write_frames_source
from data.data_media import index_of, level_of
from surgenet_ssl.data.augment import FastMultiCrop
from surgenet_ssl.data.loader import build_train_loader
from surgenet_ssl.dino.recipe import CropsRecipe

FRAMES = 30  # per video; frame k is grey at level_of(k), so a crop's source frame can be read back


class Probe:
    """A transform that reports which frame each of the two global views was made from."""

    def __call__(self, image, second=None) -> list[torch.Tensor]:
        first = index_of(np.asarray(image))
        return [torch.tensor(first), torch.tensor(index_of(np.asarray(second)) if second is not None else first)]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = tmp_path_factory.mktemp("temporal")
    videos = {f"v{v}": [np.full((30, 40, 3), level_of(k), np.uint8) for k in range(FRAMES)] for v in range(3)}
    write_frames_source(r, "two_fps", videos, fps=2.0, shard_max=12)  # 3 shards per video
    return r


def pairs(root: Path, p: float, window: float, **kw) -> list[tuple[str, int, int]]:
    loader = build_train_loader(
        {"name": "custom", "path": str(root / "two_fps")},
        root,
        Probe(),
        batch_size=6,
        num_workers=kw.pop("workers", 0),
        temporal_positive_p=p,
        temporal_window_s=window,
        **kw,
    )
    out = []
    for batch in loader:
        a, b = batch["crops"]
        out += [(k, int(x), int(y)) for k, x, y in zip(batch["key"], a, b, strict=True)]
    return out


def test_off_by_default_the_second_crop_is_the_same_frame(root: Path) -> None:
    assert CropsRecipe().temporal_positive_p == 0.0
    assert all(a == b for _, a, b in pairs(root, 0.0, 2.0))


def test_neighbours_come_from_the_same_video_within_the_window(root: Path) -> None:
    got = pairs(root, 1.0, 1.0)  # 1 s at 2 fps: at most 2 frames away
    assert len(got) == 90
    for key, a, b in got:
        assert int(key.rsplit("/", 1)[1]) == a  # the anchor is the keyed frame
        assert b != a and abs(b - a) <= 2 and b // 12 == a // 12  # within the window, in the anchor's shard
    assert {abs(b - a) for _, a, b in got} == {1, 2}  # the whole window is used
    wide = pairs(root, 1.0, 2.5)  # 5 frames
    assert max(abs(b - a) for _, a, b in wide) == 5


def test_the_probability_is_the_share_of_samples_with_a_neighbour(root: Path) -> None:
    got = [abs(b - a) > 0 for _, a, b in pairs(root, 0.3, 1.0, steps_per_epoch=50)]
    share = sum(got) / len(got)  # 300 samples: the binomial's 4-sigma band is +-0.11
    assert 0.19 < share < 0.41, share


def test_a_resumed_run_makes_the_same_pairs(root: Path) -> None:
    full = pairs(root, 0.5, 1.0, workers=2)
    resumed = pairs(
        root, 0.5, 1.0, workers=2, resume_position={"epoch": 0, "epoch_samples": 36, "batches": 0, "workers": {}}
    )
    assert resumed == full[36:] and len(resumed) == 54


def test_only_frames_the_epoch_may_use_are_neighbours(root: Path) -> None:
    dataset = {"name": "custom", "path": str(root / "two_fps"), "fraction": 0.5}
    loader = build_train_loader(
        dataset, root, Probe(), batch_size=4, num_workers=0, temporal_positive_p=1.0, temporal_window_s=3.0
    )
    seen = [(k, int(a), int(b)) for batch in loader for k, a, b in zip(batch["key"], *batch["crops"], strict=True)]
    kept = {(k.split("/")[1], int(k.rsplit("/", 1)[1])) for k, _, _ in seen}
    assert all((k.split("/")[1], b) in kept for k, _, b in seen)  # never a frame the fraction left out


def test_sampling_resampled_refuses_temporal_positives(root: Path) -> None:
    with pytest.raises(ValueError, match="needs data.sampling=epoch"):
        pairs(root, 0.5, 1.0, sampling="resampled")


def test_the_multi_crop_cuts_the_second_global_crop_from_the_neighbour() -> None:
    off = {"flip": 0.0, "jitter": 0.0, "gray": 0.0, "blur": (0.0, 0.0, 0.0), "solarize": 0.0}
    crop = FastMultiCrop(64, 32, local_crops_number=2, uint8_output=True, seed=0, probabilities=off)
    dark, bright = np.full((80, 100, 3), 40, np.uint8), np.full((80, 100, 3), 200, np.uint8)
    crops = crop(dark, second=bright)
    assert [int(c.float().mean().round()) for c in crops] == [40, 200, 40, 40]
    same = FastMultiCrop(64, 32, local_crops_number=2, uint8_output=True, seed=0, probabilities=off)(dark)
    assert [int(c.float().mean().round()) for c in same] == [40, 40, 40, 40]

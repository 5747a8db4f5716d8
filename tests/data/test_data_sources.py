"""Registry and dataset configs against the published numbers (SURGENET.md sections 1-2)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from surgenet_ssl.config.dirs import CONFIG_DIR
from surgenet_ssl.data.sources import (
    MIXTURES,
    SOURCES,
    canonical_source_name,
    mixture_published_frames,
    mixture_sources,
)

CONFIGS = CONFIG_DIR

# Section 2 of SURGENET.md, typed in by hand (not computed from the registry).
PUBLISHED_TOTALS = {
    "cholec": 250_655,
    "ramie": 377_287,
    "rarp": 382_416,
    "public": 1_997_987,
    "surgenet": 2_636_790,
    "small": 263_679,
    "surgenetxl": 4_711_024,
}


def test_fourteen_sources_with_published_counts() -> None:
    assert len(SOURCES) == 14
    assert SOURCES["cholec80"].frames == 179_164 and SOURCES["cholec80"].videos == 76
    assert SOURCES["youtube"].frames == 2_074_234 and SOURCES["youtube"].videos == 3_253
    assert SOURCES["surgtoolloc2022"].videos is None
    assert {n for n, s in SOURCES.items() if not s.public} == {"ramie_umcu", "rarp_avl"}
    assert sum(s.frames for s in SOURCES.values()) == 4_711_024


@pytest.mark.parametrize("mixture", list(PUBLISHED_TOTALS))
def test_mixture_totals_equal_publication(mixture: str) -> None:
    assert mixture_published_frames(mixture) == PUBLISHED_TOTALS[mixture]
    assert MIXTURES[mixture].published_frames == PUBLISHED_TOTALS[mixture]


def test_mixture_compositions() -> None:
    assert set(MIXTURES) == set(PUBLISHED_TOTALS)
    assert mixture_sources("cholec") == ("cholec80", "heichole", "hsdb_chole")
    assert mixture_sources("rarp") == ("esad", "psi_ava", "rarp_avl")
    assert len(mixture_sources("surgenet")) == 13 and "youtube" not in mixture_sources("surgenet")
    assert set(mixture_sources("surgenetxl")) == set(SOURCES)
    assert not {"youtube", "ramie_umcu", "rarp_avl"} & set(mixture_sources("public"))
    assert len(mixture_sources("public")) == 11
    assert mixture_sources("small") == mixture_sources("surgenet") and MIXTURES["small"].fraction == 0.1
    with pytest.raises(KeyError, match="Valid mixtures"):
        mixture_sources("cholec81")


@pytest.mark.parametrize("mixture", list(PUBLISHED_TOTALS))
def test_dataset_configs_match_registry(mixture: str) -> None:
    cfg = OmegaConf.load(CONFIGS / "dataset" / f"{mixture}.yaml")
    assert cfg.name == mixture
    assert tuple(cfg.sources) == mixture_sources(mixture)
    assert all(w is None for w in cfg.sources.values())  # default: proportional to frames
    assert cfg.fraction == MIXTURES[mixture].fraction
    assert cfg.allow_missing is False


def test_aliases() -> None:
    assert canonical_source_name("hSDB-Chole") == "hsdb_chole"
    assert canonical_source_name("Cholec80") == "cholec80"
    assert canonical_source_name("PSI-AVA") == "psi_ava"
    assert canonical_source_name("YouTube") == "youtube"
    assert canonical_source_name("my_new_source") is None


def test_dataset_group_composes_with_train_config() -> None:
    """Every dataset= option composes with the training config and resolves its root from paths.data_root."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        for option in [*PUBLISHED_TOTALS, "demo", "custom"]:
            cfg = compose(
                config_name="train", overrides=[f"dataset={option}", "paths.data_root=/d", "paths.cache_dir=/c"]
            )
            assert cfg.dataset.name == option
            if option == "demo":
                assert cfg.dataset.root == "/c" and cfg.dataset.generate == "demo"
            elif option != "custom":
                assert cfg.dataset.root == "/d"


def test_registry_says_what_each_release_ships() -> None:
    # hSDB ships .tar archives of 1-fps JPEG folders and Surgical YouTube zips of frames: frames, not video
    frames = {n for n, s in SOURCES.items() if s.distributed_as == "frames"}
    assert frames == {"hsdb_chole", "hsdb_gastric", "youtube", "esad", "psi_ava", "dsad", "glenda", "lapgyn4"}
    video = {n for n, s in SOURCES.items() if s.distributed_as == "video"}
    assert video == {"cholec80", "heichole", "ramie_umcu", "rarp_avl", "multibypass140", "surgtoolloc2022"}
    # Cholec80: the release has 80 videos, the papers used 76; the note says how to pick 76
    assert SOURCES["cholec80"].release_videos == 80 and "exclude_videos" in SOURCES["cholec80"].note

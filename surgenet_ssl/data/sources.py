"""Registry of the 14 SurgeNet source datasets and the 7 published mixtures.

One table, one truth: the `dataset=` configs list these names, `python -m surgenet_ssl.datasets` prints them,
the prepare CLI takes procedure/defaults from them, and a test checks the totals against the publications
(SurgeNet / SurgeNetXL, frames sampled at 1 fps).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "SOURCES",
    "MIXTURES",
    "SMALL_FRACTION",
    "Source",
    "Preset",
    "PRESETS",
    "Mixture",
    "get_source",
    "canonical_source_name",
    "mixture_published_frames",
    "mixture_sources",
]


@dataclass(frozen=True)
class Source:
    """A source dataset as published: ``frames`` is the number of 1-fps frames the papers used."""

    name: str  # our identifier: directory name under paths.data_root and key in dataset configs
    display: str  # the name used in the papers
    procedure: str
    videos: int | None  # None where the paper gives no count (SurgToolLoc2022)
    frames: int
    public: bool
    distributed_as: str  # "video" or "frames": what users get from the dataset owners
    group: str  # the mixture column of the paper: cholec, ramie, rarp, others, xl
    release_videos: int | None = None  # videos in the release where it differs from what the papers used
    note: str = ""  # why a prepared count may differ from the published one, and what to do


@dataclass(frozen=True)
class Preset:
    """How ``prepare`` reads a source's release as distributed (zipped or unzipped), so no flags are needed.

    ``include``/``exclude``: glob patterns (see surgenet_ssl.data.preparation.Selection); ``video_pattern``: a
    regex on image names whose group ``video`` names the video the frame comes from.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    video_pattern: str | None = None
    note: str = ""  # what the preset keeps and leaves out, for the README and the log


# Release layouts from the datasets' own READMEs and loaders (and the SurgeNet repository's create_SurgeNetXL.py).
PRESETS: dict[str, Preset] = {
    # <organ>/<surgery>/imageNN.png beside maskNN.png, anno_1..3/, merged/, multilabel/maskNN_<organ>.png
    "dsad": Preset(
        include=("image*.png",), exclude=("anno_*", "merged", "multilabel"), note="imageNN.png only (no masks)"
    ),
    # v1.0 DS/{pathology,no_pathology}/frames/... plus DS/pathology/annotations/ masks; v1.5: frames/ and annots/
    "glenda": Preset(exclude=("annotations", "annots"), note="frames, not the annotation masks"),
    # keyframes/CASE0NN/NNNNN.jpg at 1 fps; the full download adds images_8_frames_per_second/
    "psi_ava": Preset(include=("keyframes",), note="the 1-fps keyframes/ (not the 8-fps copy)"),
    # Videos/Full/*.mp4 plus Full/HD/ duplicates and Skill/ clips
    "heichole": Preset(exclude=("HD", "Skill"), note="Videos/Full without the Full/HD/ copies and Skill/ clips"),
    # train/set1, train/set2, val/obj (47,282 = 40,152 + 7,130), test/ and test_labels/ beside them
    "esad": Preset(exclude=("test", "test_labels"), note="train + val (not test)"),
    # <procedure>/Batch<k>/<video>_frame_<n>_Sample<i>.jpg, 10,000 per folder, in zips
    "youtube": Preset(
        video_pattern=r"(?P<video>.+?)_frame_\d+(_Sample\d+)?", note="video id from <video>_frame_<n>_Sample<i>"
    ),
}


SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        # videos/frames: the SurgeNet / SurgeNetXL papers' source table (frames at 1 fps). distributed_as: the
        # datasets' own READMEs and loaders (what a user downloads), see the README's table of sources.
        # Cholec80 (CAMMA release, one zip): videos/video01..80.mp4 at 25 fps, 80 videos; the papers used 76
        # without naming the 4 left out: all 80 are prepared, exclude_videos= leaves 4 out to match.
        Source(
            "cholec80", "Cholec80", "laparoscopic cholecystectomy", 76, 179_164, True, "video", "cholec",
            release_videos=80,
            note="the release has 80 videos, the papers used 76 (unnamed): exclude_videos=[4 ids] picks 76",
        ),
        # HeiChole: Videos/Full/*.mp4 (17 at 25 fps, 7 at 50 fps) plus Full/HD/ copies and Skill/ clips (preset)
        Source("heichole", "HeiChole", "laparoscopic cholecystectomy", 30, 53_427, True, "video", "cholec"),
        # hSDB-Chole / hSDB-Gastric: .tar archives of flat folders of 1-fps JPEGs plus COCO json: frames, not video
        Source("hsdb_chole", "hSDB-Chole", "laparoscopic cholecystectomy", 24, 18_064, True, "frames", "cholec"),
        Source("ramie_umcu", "RAMIE-UMCU", "robot-assisted esophagectomy", 28, 377_287, False, "video", "ramie"),
        # ESAD: zips train/set1, train/set2, val/obj, test, test_labels of JPEG frames; 47,282 = train + val
        Source("esad", "ESAD", "robot-assisted prostatectomy", 28, 47_282, True, "frames", "rarp"),
        # PSI-AVA: keyframes/CASE0NN/NNNNN.jpg at 1 fps (the full download adds an 8-fps copy)
        Source("psi_ava", "PSI-AVA", "robot-assisted prostatectomy", 8, 73_618, True, "frames", "rarp"),
        Source("rarp_avl", "RARP-AvL", "robot-assisted prostatectomy", 8, 261_516, False, "video", "rarp"),
        # DSAD: <organ>/<surgery>/imageNN.png beside masks (preset keeps images only)
        Source("dsad", "DSAD", "robot-assisted rectal resection/extirpation", 32, 14_623, True, "frames", "others"),
        # GLENDA v1.0/v1.5: frames/ folders plus annotation masks (preset leaves the masks out)
        Source("glenda", "GLENDA", "gynecologic laparoscopy", 400, 25_682, True, "frames", "others"),
        # LapGyn4: LapGyn4_v1.2.zip, 4 subsets, a folder per class, JPEG
        Source("lapgyn4", "LapGyn4", "gynecologic laparoscopy", 500, 59_616, True, "frames", "others"),
        # MultiBypass140: multibypass01..05.zip -> BernBypass70/videos/*.mp4, StrasBypass70/videos/*.mp4
        Source(
            "multibypass140", "MultiBypass140", "laparoscopic gastric bypass", 140, 749_419, True, "video", "others",
        ),
        Source("hsdb_gastric", "hSDB-Gastric", "robot-assisted gastrectomy", 24, 35_576, True, "frames", "others"),
        # SurgToolLoc2022: 24,695 mp4 clips, 60 fps, 30 s each (the paper gives no video count)
        Source(
            "surgtoolloc2022", "SurgToolLoc2022", "11 robot-assisted porcine procedures", None, 741_516, True,
            "video", "others",
        ),
        # Surgical YouTube (the SurgeNet authors' gated Hugging Face dataset): <procedure>/Batch<k>/
        # <video>_frame_<n>_Sample<i>.jpg in zips (or parquet): frames, the video named in the file name (preset)
        Source(
            "youtube", "YouTube (Surgical YouTube)", "23 identified procedures", 3_253, 2_074_234, True, "frames",
            "xl",
        ),
    ]
}  # fmt: skip

# The published "SurgeNetSmall" is 10% of SurgeNet. Ours keeps a frame when a hash of its stable key falls below
# this fraction (see surgenet_ssl.data.shards.keep_frame): the same frames on every machine and every run.
SMALL_FRACTION = 0.1


@dataclass(frozen=True)
class Mixture:
    """A published pretraining mixture: its sources and the fraction of their frames it uses."""

    name: str
    sources: tuple[str, ...]
    fraction: float
    published_frames: int
    description: str


def _names(*groups: str, exclude: tuple[str, ...] = ()) -> tuple[str, ...]:
    return tuple(n for n, s in SOURCES.items() if s.group in groups and n not in exclude)


_SURGENET = _names("cholec", "ramie", "rarp", "others")

MIXTURES: dict[str, Mixture] = {
    m.name: m
    for m in [
        Mixture("cholec", _names("cholec"), 1.0, 250_655, "Cholec80 + HeiChole + hSDB-Chole"),
        Mixture("ramie", _names("ramie"), 1.0, 377_287, "RAMIE-UMCU (private)"),
        Mixture("rarp", _names("rarp"), 1.0, 382_416, "ESAD + PSI-AVA + RARP-AvL"),
        Mixture(
            "public", tuple(n for n in _SURGENET if SOURCES[n].public), 1.0, 1_997_987,
            "every source except YouTube, RAMIE-UMCU and RARP-AvL",
        ),
        Mixture("surgenet", _SURGENET, 1.0, 2_636_790, "all 13 sources except YouTube"),
        Mixture("small", _SURGENET, SMALL_FRACTION, 263_679, "deterministic 10% frame subsample of surgenet"),
        Mixture("surgenetxl", _SURGENET + ("youtube",), 1.0, 4_711_024, "surgenet + YouTube"),
    ]
}  # fmt: skip


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_ALIASES = {_normalise(k): k for k in SOURCES} | {_normalise(s.display): s.name for s in SOURCES.values()}
_ALIASES[_normalise("YouTube")] = "youtube"


def canonical_source_name(name: str) -> str | None:
    """Registry name for ``name`` (case/punctuation-insensitive: "hSDB-Chole" -> "hsdb_chole"), else None."""
    return _ALIASES.get(_normalise(name))


def get_source(name: str) -> Source | None:
    canonical = canonical_source_name(name)
    return SOURCES[canonical] if canonical else None


def mixture_sources(name: str) -> tuple[str, ...]:
    try:
        return MIXTURES[name].sources
    except KeyError:
        raise KeyError(f"Unknown mixture {name!r}. Valid mixtures: {', '.join(MIXTURES)}") from None


def mixture_published_frames(name: str) -> int:
    """Frames of a mixture computed from the source table (a fraction rounds down, as 10% of surgenet does)."""
    m = MIXTURES[name]
    return int(sum(SOURCES[s].frames for s in m.sources) * m.fraction)

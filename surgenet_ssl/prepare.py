"""``python -m surgenet_ssl.prepare source=NAME input=DIR [output=DIR] [fps=1]``: videos/frames -> shards.

``input=[DIR1,DIR2]`` feeds one source from several locations; a later run with another input adds to it.

Thin Hydra entry point around :func:`surgenet_ssl.data.preparation.prepare_source` (surgenet_ssl/configs/prepare.yaml).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from surgenet_ssl.config.dirs import CONFIG_DIR
from surgenet_ssl.data.sources import PRESETS, SOURCES, Preset, canonical_source_name, get_source
from surgenet_ssl.runtime.storage_errors import RunDirFileHandler, storage_error_message, write_failure_message

log = logging.getLogger("surgenet_ssl.prepare")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


def _fail(message: str) -> None:
    log.error(message)
    sys.exit(2)


def _patterns(value: object, preset: tuple[str, ...]) -> tuple[str, ...]:
    """include=/exclude= from the command line (a glob or a list); null keeps the registry preset, [] clears it."""
    if value is None:
        return preset
    items = list(value) if OmegaConf.is_list(value) else [value]  # type: ignore[call-overload]
    return tuple(str(v) for v in items if str(v))


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run(cfg: DictConfig) -> int:
    """Validate the config, prepare the source, return the number of frames in its manifest."""
    if not cfg.source:
        _fail(f"source=NAME is required: one of {', '.join(SOURCES)} or a new name (letters, digits, _ and -).")
    source = str(cfg.source)
    canonical = canonical_source_name(source)
    if canonical and canonical != source:
        log.info("source=%s is the registered source %r; using that name", source, canonical)
        source = canonical
    if not _NAME.match(source):
        _fail(f"source={source!r}: use letters, digits, '_' and '-' only (it names a directory and the frame keys).")
    OmegaConf.update(cfg, "source", source)
    if not cfg.input:
        _fail(
            "input=DIR is required: the folder with the source's videos and/or frame folders (or one video); "
            "input=[DIR1,DIR2] for several."
        )
    # Imported once the command line is checked: the preparation code (numpy, PIL, video readers) is not light.
    from surgenet_ssl.data.preparation import PrepareError, PrepareSettings, Selection, prepare_source
    from surgenet_ssl.data.video_exclusion import load_video_exclusion

    raw_exclude = cfg.get("exclude_videos")
    try:
        exclusion = load_video_exclusion(list(raw_exclude) if OmegaConf.is_list(raw_exclude) else raw_exclude)
    except ValueError as e:
        _fail(str(e))
        raise  # unreachable

    reg = get_source(source)
    procedure = cfg.procedure or (reg.procedure if reg else "unknown")
    preset = PRESETS.get(source, Preset()) if reg else Preset()
    select = Selection(
        include=_patterns(cfg.include, preset.include),
        exclude=_patterns(cfg.exclude, preset.exclude),
        video_pattern=preset.video_pattern if cfg.video_pattern is None else (str(cfg.video_pattern) or None),
    )
    if select != Selection():
        log.info("%s: reading %s%s", source, select, f" (registry preset: {preset.note})" if preset.note else "")
    sampling = str(cfg.sampling) if cfg.sampling else ("surgenet" if reg else "round")
    output = Path(str(cfg.output)).expanduser()
    workers = int(cfg.workers) if cfg.workers is not None else available_cpus()
    settings = PrepareSettings(
        source=source,
        procedure=str(procedure),
        fps=None if cfg.fps in (None, 0) else float(cfg.fps),
        resize_short=None if cfg.resize_short in (None, 0) else int(cfg.resize_short),
        jpeg_quality=int(cfg.jpeg_quality),
        shard_max_frames=int(cfg.shard_max_frames),
        image_stride=int(cfg.image_stride),
        backend=str(cfg.backend),
        sampling=sampling,
        frame_list=str(Path(str(cfg.frame_list)).expanduser()) if cfg.frame_list else None,
    )
    output.mkdir(parents=True, exist_ok=True)
    handler = RunDirFileHandler(str(output / "prepare.log"))  # finished read-only data: console only, no failure
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    inputs = [str(p) for p in cfg.input] if OmegaConf.is_list(cfg.input) else [str(cfg.input)]
    try:
        summary = prepare_source(
            [Path(p).expanduser() for p in inputs],
            output,
            settings,
            workers=workers,
            progress=bool(cfg.progress),
            overwrite=bool(cfg.overwrite),
            input_prefix=bool(cfg.input_prefix),
            select=select,
            verify=bool(cfg.get("verify", True)),
            exclude_videos=exclusion,
        )
    except PrepareError as e:
        _fail(str(e))
        raise  # unreachable
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    print(
        f"prepared {summary.frames_total} frames of source {source} in {output} "
        f"({len(summary.units_failed)} inputs skipped, {summary.images_corrupt} corrupt images skipped)"
    )
    return summary.frames_total


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="prepare")
def main(cfg: DictConfig) -> None:
    try:
        frames = run(cfg)
    except (OSError, RuntimeError) as err:
        # a full, read-only or forbidden disk: the path and the fix
        storage = write_failure_message(err, Path(str(cfg.output)).expanduser() / "x") if cfg.output else None
        storage = storage or storage_error_message(err)
        if storage is None:
            raise
        log.debug("traceback", exc_info=True)
        log.error("%s", storage)
        sys.exit(1)
    if frames == 0:
        # Every input was unreadable or empty: say so with a failing exit code (a 0-frame source cannot train).
        log.error(
            "no frame could be prepared from %s: check the warnings above (unreadable or empty inputs)", cfg.input
        )
        sys.exit(1)


if __name__ == "__main__":
    main()

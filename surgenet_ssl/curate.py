"""``python -m surgenet_ssl.curate path=DIR``: per-frame scores, a curated view and a report for prepared sources.

Thin Hydra entry point around :func:`surgenet_ssl.data.curation.curate_source` (surgenet_ssl/configs/curate.yaml);
train on the view with ``dataset.curated=true``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from surgenet_ssl.config.dirs import CONFIG_DIR
from surgenet_ssl.runtime.storage_errors import storage_error_message

log = logging.getLogger("surgenet_ssl.curate")

_SETTINGS_KEYS = ("dark", "low_information", "blur", "duplicates", "out_of_body", "contact_sheet_frames")


def _plain(value: object) -> object:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def run(cfg: DictConfig) -> list:
    """Curate every selected source under ``cfg.path``; returns their summaries."""
    from surgenet_ssl.data.curation import CurationError, CurationSettings, FrameClassifier, curate_source
    from surgenet_ssl.data.mixture import _discover
    from surgenet_ssl.data.video_exclusion import load_frame_exclusion, load_video_exclusion

    settings = CurationSettings.from_dict({k: _plain(cfg.get(k)) for k in _SETTINGS_KEYS if cfg.get(k) is not None})
    videos = load_video_exclusion(_plain(cfg.get("exclude_videos")))
    frames = load_frame_exclusion(_plain(cfg.get("exclude_frames")))
    base = Path(str(cfg.path)).expanduser()
    found, why = _discover(base)
    wanted = _plain(cfg.get("sources"))
    if wanted:
        names = [wanted] if isinstance(wanted, str) else [str(n) for n in list(wanted)]  # type: ignore[call-overload]
        unknown = [n for n in names if n not in found]
        if unknown:
            raise CurationError(f"curate: sources {unknown} are not prepared under {base} (found: {sorted(found)})")
        found = {n: found[n] for n in names}
    if not found:
        raise CurationError(f"curate: no prepared source (manifest.json) under {base}{f': {why}' if why else ''}")
    c = settings.out_of_body.classifier
    if bool(c.model) != bool(c.weights):
        raise CurationError("curate: out_of_body.classifier needs both model (a timm name) and weights (its file)")
    classifier = FrameClassifier(c) if c.model else None  # a missing weight file fails here, before any work
    summaries = []
    for name, directory in found.items():
        log.info("curating %s (%s)", name, directory)
        summary = curate_source(
            Path(str(directory)),
            settings,
            videos=videos,
            frames=frames,
            classifier=classifier,
            rescore=bool(cfg.get("rescore", False)),
            progress=bool(cfg.get("progress", True)),
        )
        log.info(
            "%s (%d shards scored, the others' scores reused; %.1f s) -> %s",
            summary.line(),
            summary.rescored_shards,
            summary.seconds,
            summary.directory / "curation",
        )
        summaries.append(summary)
    _print_table(summaries)
    return summaries


def _print_table(summaries: list) -> None:
    """Counts per source and reason (the report's table), on stdout."""
    from surgenet_ssl.data.curation import REASONS

    used = [r for r in REASONS if any(s.counts.get(r) for s in summaries)]
    header = ["source", "frames", "kept", *used]
    rows = [[s.source, s.frames, s.kept, *(s.counts.get(r, 0) for r in used)] for s in summaries]
    if len(summaries) > 1:
        rows.append(["total", *(sum(int(r[i]) for r in rows) for i in range(1, len(header)))])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for line in [header, *rows]:
        print(
            "  ".join(
                str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(line, widths, strict=True))
            )
        )


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="curate")
def main(cfg: DictConfig) -> None:
    from surgenet_ssl.data.curation import CurationError

    try:
        run(cfg)
    except (CurationError, ValueError) as e:  # a bad setting, a missing list or classifier file: one message
        log.error("%s", e)
        sys.exit(2)
    except OSError as e:
        message = storage_error_message(e)
        if message is None:
            raise
        log.error("%s", message)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Downstream fine-tuning: ``python -m surgenet_ssl.finetune``.

    python -m surgenet_ssl.finetune task=segmentation weights=PATH|null backbone=NAME data.train=DIR data.val=DIR
    python -m surgenet_ssl.finetune task=classification task.mode=linear weights=PATH data.train=CSV data.val=CSV
    python -m surgenet_ssl.finetune task=segmentation  # the demo: labelled demo cases, demo teacher vs random init

Thin Hydra entry point around :func:`surgenet_ssl.downstream.runner.run_finetune` (``configs/finetune.yaml``):
fine-tunes an FPN (segmentation) or a classifier for every weights variant and seed, writes ``results.json`` (mean
and std over seeds), CSV/wandb logs per run and overlay PNGs, prints a comparison table and, last,
``<metric>=<mean of the first variant>``. Bad input ends with a one-paragraph error and exit status 1.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import surgenet_ssl.config.resolvers  # noqa: F401 - registers the ${surgenet.*} resolvers of the configs
from surgenet_ssl.config.dirs import CONFIG_DIR

log = logging.getLogger("surgenet_ssl.finetune")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="finetune")
def main(cfg: DictConfig) -> None:
    # Imported here, not at the top: it imports torch, torchvision and sklearn (seconds), which `--cfg job` and
    # Hydra's errors for a bad override do not need.
    from surgenet_ssl.downstream.runner import format_summary, run_finetune

    try:
        results = run_finetune(cfg)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        log.debug("traceback", exc_info=True)
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    if results is None:  # not global rank 0
        return
    for line in format_summary(results):
        print(line)
    print(f"results={Path(str(cfg.output)) / 'results.json'}")
    first = next(iter(results["variants"].values()))
    value = first["mean"].get(results["primary_metric"])
    print(f"{results['primary_metric']}={'nan' if value is None else f'{value:.4f}'}", flush=True)


if __name__ == "__main__":
    main()

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
from omegaconf import DictConfig, OmegaConf

from surgenet_ssl.config_dirs import CONFIG_DIR
from surgenet_ssl.resources import auto_workers

log = logging.getLogger("surgenet_ssl.finetune")


def _from_train(name: str):
    """A config resolver of ``surgenet_ssl.train``, imported when first resolved: importing Lightning takes seconds,
    and a run with bad input should fail before that."""

    def resolve(*args):
        import surgenet_ssl.train as train  # noqa: PLC0415 - registers its resolvers (the same functions) too

        return getattr(train, name)(*args)

    return resolve


OmegaConf.register_new_resolver("surgenet.auto_workers", auto_workers, replace=True)
for _name, _function in (("surgenet.auto_precision", "auto_precision"), ("surgenet.sweep_subdir", "sweep_subdir")):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _from_train(_function), replace=True)


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

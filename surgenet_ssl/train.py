"""``python -m surgenet_ssl.train [group=option ...] [key=value ...]``: DINO pretraining.

Thin Hydra entry point around :func:`surgenet_ssl.training.pretrain.run_pretraining`: composes
``configs/train.yaml``, builds the LightningModule, data module, callbacks and loggers from it, resumes from the run
dir's newest checkpoint if there is one, trains, exports the teacher and prints the export directory on the last
line. Bad input, a diverged run or a full disk end with one clear message and exit status 1.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

# Only light modules at the top: torch, Lightning, timm and the module/data module/callbacks built on them take
# seconds to import, so they are imported inside the functions that use them. `--cfg job`, a bad group option
# (Hydra's "Available options"), a missing required value and a dataset config mistake then fail or print without
# paying for them.
import surgenet_ssl.config.resolvers  # noqa: F401 - registers the ${surgenet.*} resolvers of the configs
from surgenet_ssl.config.dirs import CONFIG_DIR
from surgenet_ssl.runtime.cluster import PREEMPTION, RunDirInUseError, TrainingPreempted, is_global_rank_zero
from surgenet_ssl.runtime.storage_errors import storage_error_message, write_failure_message
from surgenet_ssl.training.pretrain import run_pretraining

log = logging.getLogger("surgenet_ssl.train")


def _close_loggers() -> None:
    """Finish wandb before the last message (its teardown on a full disk would print after it)."""
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1)
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        export_dir, is_global_zero = run_pretraining(cfg)
    except TrainingPreempted as stop:
        # Every rank stopped at the same step after the checkpoint was written; rank 0 requeues the job.
        if is_global_rank_zero():
            outcome = PREEMPTION.requeue()
            print(f"preempted at optimizer step {stop.step}: checkpoint {stop.checkpoint}; {outcome}", flush=True)
        return
    except (FloatingPointError, ValueError, FileNotFoundError, RunDirInUseError) as err:
        # Bad input and diverged runs end with their one clear message; the traceback goes to the log file.
        storage = storage_error_message(err)
        log.debug("traceback", exc_info=True)
        log.error("%s", storage or err)
        sys.exit(1)
    except (OSError, RuntimeError) as err:
        # a full, read-only or forbidden disk: the path and the fix (torch.save's own errors on a full run dir too)
        storage = write_failure_message(err, Path(cfg.paths.output_dir) / "checkpoints" / "x")
        if storage is None:
            raise
        log.debug("traceback", exc_info=True)
        logging.raiseExceptions = False  # log handlers writing to the full disk (wandb's too) stay silent
        _close_loggers()
        log.error("%s", storage)
        sys.exit(1)
    except SystemExit as stop:
        if type(stop).__name__ != "SIGTERMException":  # Lightning's: SIGTERM stopped training (exit status 0)
            raise
        log.error(
            "training stopped early: SIGTERM received (not the SLURM preemption signal, which checkpoints and "
            "requeues). Rerun the same command to resume from the newest checkpoint in %s.",
            Path(cfg.paths.output_dir) / "checkpoints",
        )
        sys.exit(128 + signal.SIGTERM)
    if is_global_zero:
        print(f"export_dir={export_dir}")


if __name__ == "__main__":
    main()

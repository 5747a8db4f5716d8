"""Teacher export entry point: ``python -m surgenet_ssl.export ckpt=PATH [output=DIR]``.

From a Lightning checkpoint of a run it writes, into ``<run_dir>/export/`` (or ``output``):

- ``<dataset>_<backbone>_epoch<NNNN>_teacher.pth``: flat dict of CPU tensors in SurgeNet naming (the published
  teacher format: backbone only, no head, no prefix), loadable by the published SurgeNet loaders;
- ``<dataset>_<backbone>_epoch<NNNN>_teacher.safetensors``: the same weights in timm naming;
- ``<dataset>_<backbone>_epoch<NNNN>_checkpoint.pth``: the full state in the official DINO checkpoint layout
  (``student``/``teacher`` with ``backbone.*``/``head.*``, ``optimizer``, ``epoch``, ``args``, ``dino_loss``).

The export itself lives in :mod:`surgenet_ssl.training.teacher_export` (shared with the end-of-training callback); this
entry point only reads the command line and the checkpoint file.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

USAGE = "usage: python -m surgenet_ssl.export ckpt=PATH [output=DIR] [dataset=NAME] [backbone=NAME]"


def main(argv: list[str] | None = None) -> int:
    """``python -m surgenet_ssl.export ckpt=PATH [output=DIR] [dataset=NAME] [backbone=NAME]``.

    PATH: a Lightning checkpoint of a run (``last.ckpt``, ``epoch...ckpt``, ``step...ckpt``, ``hpc_ckpt_N.ckpt``)
    or a full DINO checkpoint. Output defaults to ``<run_dir>/export``. The last line printed is the output dir.
    """
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    argv = argv if argv is not None else sys.argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n" + (main.__doc__ or "").split("\n", 1)[1])
        return 0
    bad = [a for a in argv if "=" not in a]
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = sorted(set(args) - {"ckpt", "output", "dataset", "backbone"})
    if "ckpt" not in args or unknown or bad:
        print(f"error: unexpected arguments {unknown + bad}\n{USAGE}" if unknown or bad else USAGE, file=sys.stderr)
        return 2
    ckpt_path = Path(args["ckpt"])
    if not ckpt_path.is_file():
        print(f"error: checkpoint not found: {ckpt_path}\n{USAGE}", file=sys.stderr)
        return 2
    # Imported here, after the argument checks: torch and the export code take seconds to import.
    from surgenet_ssl.models.weights import read_state_dict
    from surgenet_ssl.training.teacher_export import export_checkpoint, export_dino_checkpoint

    try:  # the one weight loader: weights_only (a pickled payload is refused, never run), damaged files named
        checkpoint = read_state_dict(ckpt_path)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        if "state_dict" in checkpoint:
            run_dir = ckpt_path.resolve().parent
            run_dir = run_dir.parent if run_dir.name == "checkpoints" else run_dir
            output = Path(args.get("output") or run_dir / "export")
            paths = export_checkpoint(checkpoint, output, dataset=args.get("dataset"))
        elif "teacher" in checkpoint:
            output = Path(args.get("output") or ckpt_path.resolve().parent / "export")
            paths = export_dino_checkpoint(checkpoint, output, args.get("backbone"), args.get("dataset"))
        else:
            raise ValueError(
                f"{ckpt_path} is neither a surgenet-ssl Lightning checkpoint ('state_dict') nor a full DINO "
                f"checkpoint ('teacher'); top-level keys: {sorted(checkpoint)[:10]}"
            )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the disk: one message; anything else: re-raised
        from surgenet_ssl.runtime.storage_errors import write_failure_message

        storage = write_failure_message(err, output / "export")
        if storage is None:
            raise
        print(f"error: {storage}", file=sys.stderr)
        return 1
    for p in paths.values():
        print(p)
    print(f"export_dir={output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

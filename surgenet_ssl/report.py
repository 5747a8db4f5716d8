"""Ablation report: ``python -m surgenet_ssl.report DIR... [output=DIR]``.

Finds every pretraining run (``config.yaml`` + ``export/``/``checkpoints/``) and every finetune / evaluate
``results.json`` under the given sweep dirs (or one run dir), matches results to the teacher they used, and writes
``report.md`` + ``report.csv`` (one row per pretrained model and per random-init baseline: mixture, frames, epochs,
backbone, every downstream metric as mean ± std over seeds) and figures (``scaling.png``: metric vs pretraining
frames; ``ranks.png``: rank chart across tasks; ``tsne.png``: each run's t-SNE map). ``output`` defaults to
``<first DIR>/report``. The last line printed is ``report=<output>/report.md``.

A plain command line (not Hydra): a list of directories is its natural argument.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

USAGE = "usage: python -m surgenet_ssl.report DIR [DIR ...] [output=DIR]"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n" + (__doc__ or "").split("\n", 2)[2])
        return 0 if argv else 2
    options = dict(a.split("=", 1) for a in argv if "=" in a and not Path(a).exists())
    dirs = [a for a in argv if not ("=" in a and not Path(a).exists())]
    unknown = sorted(set(options) - {"output"})
    if unknown or not dirs:
        print(f"error: unexpected argument(s) {unknown}\n{USAGE}" if unknown else USAGE, file=sys.stderr)
        return 2
    output = Path(options.get("output") or Path(dirs[0]) / "report")
    from surgenet_ssl.reporting import make_report

    try:
        summary = make_report(dirs, output)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"{summary['runs']} pretraining run(s), {summary['results']} results.json file(s), "
        f"{len(summary['columns'])} metric column(s)"
    )
    for note in summary["notes"]:
        print(f"note: {note}")
    for path in summary["files"].values():
        print(path)
    print(f"report={output / 'report.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

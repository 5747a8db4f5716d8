"""Frames/s and data-wait of training runs side by side: the last ``perf/images_per_s`` and
``perf/data_wait_fraction`` in each run directory's metrics CSV (the throughput callback's). Used by
scripts/device_check.sh to compare cpu / gpu-aug / gpu-decode.

    python scripts/perf_summary.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

KEYS = ("perf/images_per_s", "perf/data_wait_fraction")


def last_values(run_dir: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for path in sorted(run_dir.rglob("metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                found.update({k: row[k] for k in KEYS if row.get(k)})
    return found


def main(argv: list[str]) -> int:
    print("run\\t" + "\\t".join(KEYS))
    for arg in argv:
        values = last_values(Path(arg))
        print(f"{Path(arg).name}\\t" + "\\t".join(values.get(k, "-") for k in KEYS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

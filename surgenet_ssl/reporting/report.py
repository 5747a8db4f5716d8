"""Build the ablation report: one row per pretrained model (and per random-init baseline), one column per downstream
metric (mean and std over seeds), written as ``report.csv`` + ``report.md`` with figures.

All files are first written into ``<output>/.partial`` and moved into ``<output>`` together at the end: an error
never leaves half a report.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .discover import PretrainRun, ResultEntry, find_results, find_runs, match_results
from .figures import rank_figure, ranks, scaling_figure, tsne_grid

__all__ = ["build_rows", "write_report", "make_report"]

log = logging.getLogger(__name__)

# a report file's content, or a function of the figures written so far (name -> path) that makes it
FileContent = str | bytes | Callable[[dict[str, Any]], str | bytes]

_FIXED = [
    "model",
    "kind",
    "backbone",
    "dataset",
    "fraction",
    "pretrain_frames",
    "frames_seen",
    "epochs",
    "online_knn_top1",
    "run_dir",
]


def build_rows(runs: Sequence[PretrainRun], entries: Sequence[ResultEntry]) -> tuple[list[dict], list[str], list[str]]:
    """``(rows, metric columns, notes)``. The newest result wins when a model has several for the same column."""
    match_results(runs, entries)
    rows: dict[str, dict[str, Any]] = {}
    for r in runs:
        rows[str(r.path)] = {
            "model": r.name,
            "kind": "pretrained",
            "backbone": r.backbone,
            "dataset": r.dataset,
            "fraction": r.fraction,
            "pretrain_frames": r.pretrain_frames,
            "frames_seen": r.frames_seen,
            "epochs": r.epochs,
            "online_knn_top1": r.online_knn_top1,
            "run_dir": str(r.path),
            "values": {},
            "embedding_map": r.embedding_map,
            "sources": {},
        }
    notes: list[str] = []
    for e in sorted(entries, key=lambda e: e.mtime):
        if e.run is not None:
            row = rows[str(e.run.path)]
        elif e.weights is None:  # a random-init baseline of this backbone
            key = f"random_init:{e.backbone}"
            row = rows.setdefault(
                key,
                {
                    "model": f"random init ({e.backbone})",
                    "kind": "baseline",
                    "backbone": e.backbone,
                    "dataset": "-",
                    "fraction": None,
                    "pretrain_frames": None,
                    "frames_seen": None,
                    "epochs": None,
                    "online_knn_top1": None,
                    "run_dir": "",
                    "values": {},
                    "embedding_map": None,
                    "sources": {},
                },
            )
        else:
            key = f"weights:{e.weights}"
            if key not in rows:
                notes.append(
                    f"{e.source}: weights {e.weights} belong to no pretraining run found here; shown as their own row"
                )
            row = rows.setdefault(
                key,
                {
                    "model": Path(str(e.weights)).name,
                    "kind": "external",
                    "backbone": e.backbone,
                    "dataset": "?",
                    "fraction": None,
                    "pretrain_frames": None,
                    "frames_seen": None,
                    "epochs": None,
                    "online_knn_top1": None,
                    "run_dir": "",
                    "values": {},
                    "embedding_map": None,
                    "sources": {},
                },
            )
        for column, value in e.columns.items():
            if column in row["values"]:
                notes.append(f"{row['model']}: {column} measured more than once; using the newest ({e.source})")
            row["values"][column] = value
            row["sources"][column] = str(e.source)
    first_seen: dict[str, int] = {}  # the primary metric of each task comes first (finetune lists it first)
    for e in entries:
        for column in e.columns:
            first_seen.setdefault(column, len(first_seen))
    columns = sorted(first_seen, key=lambda c: (_column_order(c), first_seen[c]))
    ordered = sorted(
        rows.values(), key=lambda r: (r["kind"] != "pretrained", r["backbone"], r["pretrain_frames"] or 0, r["model"])
    )
    return ordered, columns, notes


def _column_order(column: str) -> tuple[int, str]:
    """Tasks in a fixed order, then the data set label (``task[label]:metric``)."""
    order = ("segmentation", "classification", "multilabel", "knn", "linear_probe")
    task = next((i for i, prefix in enumerate(order) if column.startswith(prefix)), len(order))
    return task, column.split(":", 1)[0]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _cell(value: tuple | None) -> str:
    if not value or value[0] is None:
        return "-"
    mean, std, n = value
    return f"{mean:.4f} ± {std:.4f} (n={n})" if std is not None else f"{mean:.4f}" + (f" (n={n})" if n > 1 else "")


def report_csv(rows: Sequence[dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(_FIXED + [h for c in columns for h in (c, f"{c} std", f"{c} n")])
    for r in rows:
        fixed = [r[k] if r[k] is not None else "" for k in _FIXED]
        metrics = []
        for c in columns:
            mean, std, n = r["values"].get(c, (None, None, 0))
            metrics += ["" if mean is None else f"{mean:.6f}", "" if std is None else f"{std:.6f}", n or ""]
        writer.writerow(fixed + metrics)
    return buf.getvalue()


def report_markdown(
    rows: Sequence[dict],
    columns: Sequence[str],
    figures: dict[str, Path | None],
    dirs: Sequence[Path],
    notes: Sequence[str],
    n_results: int,
) -> str:
    pretrained = [r for r in rows if r["kind"] == "pretrained"]
    lines = [
        "# Ablation report",
        "",
        f"{len(pretrained)} pretraining run(s) and {n_results} downstream results.json file(s) found under "
        + ", ".join(f"`{d}`" for d in dirs)
        + ". Cells: mean ± sample std over seeds (n = seeds).",
        "",
        "| model | backbone | pretraining data | frames | frames seen | epochs | online k-NN | "
        + " | ".join(columns)
        + " |",
        "|" + "---|" * (7 + len(columns)),
    ]
    for r in rows:
        data = r["dataset"] if r["fraction"] in (None, 1.0) else f"{r['dataset']} ({r['fraction'] * 100:g}%)"
        lines.append(
            f"| {r['model']} | {r['backbone']} | {data} | {_fmt(r['pretrain_frames'])} | {_fmt(r['frames_seen'])} | "
            f"{_fmt(r['epochs'])} | {_fmt(r['online_knn_top1'], 3)} | "
            + " | ".join(_cell(r["values"].get(c)) for c in columns)
            + " |"
        )
    if columns and len(rows) > 1:
        table = ranks(rows, columns)

        def ranked(column: str) -> str:
            order = sorted(table[column].items(), key=lambda item: item[1])
            return ", ".join(f"{model} {int(rank) if rank == int(rank) else rank}" for model, rank in order)

        lines += ["", "Ranks (1 = best): " + "; ".join(f"{c}: {ranked(c)}" for c in columns)]
    lines += ["", "## Figures", ""]
    titles = {
        "scaling": "Downstream metric vs pretraining frames",
        "ranks": "Rank chart across tasks",
        "tsne": "t-SNE of the teacher features per run (coloured by source)",
    }
    for key, title in titles.items():
        png = figures.get(key)
        lines.append(f"![{title}]({png.name})" if png else f"- {title}: not drawn (no data for it)")
        lines.append("")
    lines += ["## Runs", ""]
    for r in pretrained:
        lines.append(f"- **{r['model']}**: `{r['run_dir']}`")
    tags = list(dict.fromkeys(c.rsplit(" (", 1)[1][:-1] for c in columns if c.endswith(")") and " (" in c))
    if tags:
        from surgenet_ssl.downstream.metrics import CONVENTIONS

        lines += ["", "## Conventions", "", "The convention of each column is named in brackets after the metric:", ""]
        lines += [f"- **{t}**: {CONVENTIONS.get(t, 'see the results.json metrics block')}" for t in tags]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_report(output: Path, files: dict[str, FileContent], figure_builders) -> dict[str, Path]:
    """Write everything into ``output/.partial`` and move it into ``output`` at the end (all or nothing)."""
    output.mkdir(parents=True, exist_ok=True)
    staging = output / ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        figures = {name: build(staging) for name, build in figure_builders.items()}
        written = {}
        for name, content in files.items():
            text = content(figures) if callable(content) else content
            (staging / name).write_text(text) if isinstance(text, str) else (staging / name).write_bytes(text)
        for item in sorted(staging.iterdir()):
            with open(item, "rb+") as f:
                os.fsync(f.fileno())
        for item in sorted(staging.iterdir(), key=lambda p: p.suffix == ".md"):  # the report.md last
            os.replace(item, output / item.name)
            written[item.name] = output / item.name
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def make_report(dirs: Sequence[str | Path], output: str | Path) -> dict[str, Any]:
    """Find runs and results under ``dirs`` and write the report into ``output``. Returns a summary dict."""
    roots = [Path(d).expanduser() for d in dirs]
    missing = [str(d) for d in roots if not d.is_dir()]
    if missing:
        raise FileNotFoundError(f"Not a directory: {', '.join(missing)}")
    runs = find_runs(roots)
    entries, problems = find_results(roots)
    if not runs and not entries:
        raise ValueError(
            f"No pretraining run (config.yaml + export/ or checkpoints/) and no results.json found under "
            f"{', '.join(map(str, roots))}."
        )
    rows, columns, notes = build_rows(runs, entries)
    notes = problems + notes
    n_files = len({e.source for e in entries})
    out = Path(output)
    builders = {
        "scaling": lambda d: scaling_figure(rows, columns, d / "scaling.png"),
        "ranks": lambda d: rank_figure(rows, columns, d / "ranks.png"),
        "tsne": lambda d: tsne_grid(
            [(r["model"], r["embedding_map"]) for r in rows if r["embedding_map"]], d / "tsne.png"
        ),
    }
    files: dict[str, FileContent] = {
        "report.csv": report_csv(rows, columns),
        "report.md": lambda figs: report_markdown(rows, columns, figs, roots, notes, n_files),
    }
    written = write_report(out, files, builders)
    return {
        "rows": rows,
        "columns": columns,
        "notes": notes,
        "files": written,
        "runs": len(runs),
        "results": len({e.source for e in entries}),
    }

"""Ablation reports: find pretraining runs and their downstream results under sweep dirs, tabulate and plot them
(``python -m surgenet_ssl.report DIR...``)."""

from .discover import PretrainRun, ResultEntry, find_results, find_runs, parse_model_card, pretraining_frames
from .report import build_rows, make_report

__all__ = [
    "PretrainRun",
    "ResultEntry",
    "build_rows",
    "find_results",
    "find_runs",
    "make_report",
    "parse_model_card",
    "pretraining_frames",
]

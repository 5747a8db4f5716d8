"""Find pretraining runs and downstream results under sweep directories, and match them.

A **pretraining run** is a directory with the ``config.yaml`` that ``python -m surgenet_ssl.train`` writes and an
``export/`` or ``checkpoints/`` folder (a sweep dir holds one per job; a single run dir is one). What it was trained on
comes from its config (mixture, fraction, sources, backbone, epochs) and its newest model card (``export/README.md``:
epochs trained, frames seen, final online k-NN, the sha256 of every teacher file).

A **result** is a ``results.json`` of ``python -m surgenet_ssl.finetune`` (one per task run, with a ``variants`` entry
per weights file, random init included) or of ``python -m surgenet_ssl.evaluate`` (k-NN / linear probe). It belongs
to the run whose teacher file it used: matched by the file's sha256 (recorded by finetune; any copy of the file
matches) or by its path (inside the run's ``export/``). A random-init variant becomes a baseline row per backbone.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from omegaconf import OmegaConf

__all__ = ["PretrainRun", "ResultEntry", "find_runs", "find_results", "parse_model_card", "pretraining_frames"]

log = logging.getLogger(__name__)

_SKIP_DIRS = {"wandb", "checkpoints", "csv", ".hydra", "__pycache__", "batch_trace", "runs", "overlays", "embeddings"}


@dataclass
class PretrainRun:
    path: Path
    backbone: str
    dataset: str
    fraction: float = 1.0
    sources: list[str] = field(default_factory=list)
    pretrain_frames: int | None = None
    frames_seen: int | None = None
    epochs: int | None = None
    online_knn_top1: float | None = None
    teachers: dict[str, str] = field(default_factory=dict)  # resolved path -> sha256 ('' when unknown)
    embedding_map: Path | None = None
    command: str | None = None
    name: str = ""

    def label(self) -> str:
        frac = "" if self.fraction >= 1 else f"@{self.fraction * 100:g}%"
        return f"{self.dataset}{frac}_{self.backbone}"


@dataclass
class ResultEntry:
    """One downstream measurement set: a finetune variant or an evaluate run, with its metric columns."""

    source: Path  # the results.json
    kind: str  # finetune | evaluate
    weights: str | None
    weights_sha256: str | None
    backbone: str
    columns: dict[str, tuple[float | None, float | None, int]]  # column -> (mean, std, n)
    run: PretrainRun | None = None
    mtime: float = 0.0


def _walk(dirs: Iterable[Path]) -> Iterable[Path]:
    seen = set()
    for root in dirs:
        for current, subdirs, _ in os.walk(root, followlinks=False):
            here = Path(current)
            key = here.resolve()
            if key in seen:
                subdirs[:] = []
                continue
            seen.add(key)
            subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and d not in _SKIP_DIRS)
            yield here


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:  # OSError, yaml errors wrapped by OmegaConf
        raise ValueError(f"Cannot read {path}: {type(err).__name__}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a run config (a YAML mapping).")
    return cast("dict[str, Any]", data)  # a YAML mapping: string keys


_CARD_TRAINED = re.compile(r"trained on \*\*(?P<dataset>.+?)\*\* for (?P<epochs>\d+) epoch")
_CARD_SEEN = re.compile(r"= (?P<frames>[\d,]+) frames seen")
_CARD_KNN = re.compile(r"final online k-NN: top-1 (?P<top1>[0-9.]+)")
_CARD_FILE = re.compile(r"^\| `(?P<file>[^`]+)` \|.*\| `(?P<sha>[0-9a-f]{64})` \|$", re.M)
_CARD_COMMAND = re.compile(r"```bash\n(?P<cmd>.+?)\n```", re.S)


def parse_model_card(text: str) -> dict[str, Any]:
    """The facts of an export README.md: dataset, epochs, frames seen, online k-NN, files with sha256, command."""
    out: dict[str, Any] = {"files": {m["file"]: m["sha"] for m in _CARD_FILE.finditer(text)}}
    if m := _CARD_TRAINED.search(text):
        out["dataset"], out["epochs"] = m["dataset"], int(m["epochs"])
    if m := _CARD_SEEN.search(text):
        out["frames_seen"] = int(m["frames"].replace(",", ""))
    if m := _CARD_KNN.search(text):
        out["online_knn_top1"] = float(m["top1"])
    if m := _CARD_COMMAND.search(text):
        cmd = m["cmd"].strip()
        out["command"] = None if cmd.startswith("#") else cmd
    return out


def pretraining_frames(dataset_cfg: dict[str, Any]) -> int | None:
    """Frames of the pretraining data: the published counts of registry sources x fraction, else the manifest."""
    from surgenet_ssl.data.sources import MIXTURES, SOURCES, canonical_source_name

    fraction = float(dataset_cfg.get("fraction") or 1.0)
    sources = dataset_cfg.get("sources")
    names = list(sources) if isinstance(sources, dict) else list(sources or [])
    if not names and dataset_cfg.get("name") in MIXTURES:
        names = list(MIXTURES[dataset_cfg["name"]].sources)
    canonical = [c for c in (canonical_source_name(str(n)) for n in names) if c]
    if names and len(canonical) == len(names):  # every source is a registry source
        return int(sum(SOURCES[c].frames for c in canonical) * fraction)
    # the demo and custom data: the collection / source manifest
    candidates = []
    if dataset_cfg.get("path"):
        candidates.append(Path(str(dataset_cfg["path"])) / "manifest.json")
    if dataset_cfg.get("generate") and dataset_cfg.get("root"):
        candidates.append(Path(str(dataset_cfg["root"])) / str(dataset_cfg["generate"]) / "manifest.json")
    for manifest in candidates:
        try:
            frames = json.loads(manifest.read_text()).get("frames")
        except (OSError, ValueError):
            continue
        if isinstance(frames, int):
            return int(frames * fraction)
    return None


def _newest(paths: Iterable[Path]) -> Path | None:
    paths = list(paths)
    return max(paths, key=lambda p: (p.stat().st_mtime, p.name)) if paths else None


def _read_run(path: Path) -> PretrainRun | None:
    cfg = _load_yaml(path / "config.yaml")
    backbone_cfg = cfg.get("backbone") or {}
    dataset_cfg = cfg.get("dataset") or {}
    if not isinstance(backbone_cfg, dict) or "name" not in backbone_cfg or not isinstance(dataset_cfg, dict):
        return None  # some other tool's config.yaml
    backbone = str(backbone_cfg["name"])
    if backbone == "timm":
        backbone = str(backbone_cfg.get("timm_name") or backbone)
    sources = dataset_cfg.get("sources")
    run = PretrainRun(
        path=path,
        backbone=backbone,
        dataset=str(dataset_cfg.get("name") or "?"),
        fraction=float(dataset_cfg.get("fraction") or 1.0),
        sources=[str(s) for s in (sources if isinstance(sources, (dict, list)) else [])],
        pretrain_frames=pretraining_frames(dataset_cfg),
        epochs=(cfg.get("trainer") or {}).get("max_epochs"),
    )
    export = path / "export"
    card = export / "README.md"
    if card.is_file():
        facts = parse_model_card(card.read_text())
        run.epochs = facts.get("epochs", run.epochs)
        run.frames_seen = facts.get("frames_seen")
        run.online_knn_top1 = facts.get("online_knn_top1")
        run.command = facts.get("command")
        for name, sha in facts["files"].items():
            run.teachers[str((export / name).resolve())] = sha
    for f in list(export.glob("*_teacher.pth")) + list(export.glob("*_teacher.safetensors")) if export.is_dir() else []:
        run.teachers.setdefault(str(f.resolve()), "")
    for card_file in export.glob("*_README.md") if export.is_dir() else []:  # older exports' files
        for name, sha in parse_model_card(card_file.read_text())["files"].items():
            run.teachers.setdefault(str((export / name).resolve()), sha)
    run.embedding_map = _newest((path / "embeddings").glob("epoch*.png")) if (path / "embeddings").is_dir() else None
    return run


def find_runs(dirs: Sequence[Path]) -> list[PretrainRun]:
    runs = []
    for d in _walk(dirs):
        if (d / "config.yaml").is_file() and ((d / "export").is_dir() or (d / "checkpoints").is_dir()):
            run = _read_run(d)
            if run is not None:
                runs.append(run)
    runs.sort(key=lambda r: str(r.path))
    names: dict[str, int] = {}
    for r in runs:
        names[r.label()] = names.get(r.label(), 0) + 1
    for r in runs:
        r.name = r.label() if names[r.label()] == 1 else f"{r.label()} ({r.path.name})"
    return runs


def _data_label(results: dict[str, Any]) -> str:
    if results.get("demo"):
        label = "demo"
    else:
        root = Path(str((results.get("data") or {}).get("train", {}).get("root", "data")))
        label = root.parent.name if root.name.lower() in ("train", "training", "train.csv") else root.stem
    fraction = (results.get("data") or {}).get("train_fraction", 1.0) or 1.0
    if fraction < 1:
        label += f"@{fraction * 100:g}%"
    if results.get("mode") == "linear":
        label += ",linear"
    return label


def _convention(results: dict[str, Any], key: str, task: str) -> str | None:
    """The convention tag of a metric (``per_video.relaxed.f1`` -> the tag of ``per_video.relaxed``); results.json
    files written before the tags existed used dataset-level / pooled metrics and left absent labels out of mAP."""
    named = (results.get("metrics") or {}).get("convention")
    if isinstance(named, dict):
        return named.get(key) or named.get(".".join(key.split(".")[:2]))
    if key == "mAP":
        return "absent skipped"
    if key in ("mIoU", "mDice", "accuracy", "macro_f1"):
        return "dataset-level" if task == "segmentation" else "pooled"
    return None


def _lookup(block: Any, key: str) -> Any:
    """``block["a"]["b"]`` for ``key="a.b"``; None where a part is missing."""
    for part in key.split("."):
        block = block.get(part) if isinstance(block, dict) else None
        if block is None:
            return None
    return block


_FINETUNE_COLUMNS = (
    "mIoU",
    "mDice",
    "mDice_per_image",
    "accuracy",
    "macro_f1",
    "per_video.strict.accuracy",
    "per_video.strict.jaccard",
    "per_video.relaxed.accuracy",
    "per_video.relaxed.jaccard",
    "per_video.relaxed.f1",
    "mAP",
    "balanced_accuracy",
)


def _finetune_entries(path: Path, results: dict[str, Any]) -> list[ResultEntry]:
    """One entry per variant; each column is ``task[data]:metric (convention)``."""
    task = str(results.get("task", "finetune")).replace("_classification", "")
    label = _data_label(results)
    backbone = str(results.get("timm_name") or results.get("backbone") or "?")
    metric = results.get("primary_metric")
    entries = []
    for info in (results.get("variants") or {}).values():
        columns: dict[str, tuple[float | None, float | None, int]] = {}
        n = len(info.get("runs") or [])
        keys = [metric] + [k for k in _FINETUNE_COLUMNS if k != metric]
        for key in keys:
            mean = _lookup(info.get("mean") or {}, str(key))
            if not isinstance(mean, (int, float)):
                continue
            tag = _convention(results, str(key), task)
            name = str(key).rsplit(".", 1)[-1]
            columns[f"{task}[{label}]:{name}" + (f" ({tag})" if tag else "")] = (
                mean,
                _lookup(info.get("std") or {}, str(key)),
                n,
            )
        entries.append(
            ResultEntry(
                path,
                "finetune",
                info.get("weights"),
                info.get("weights_sha256"),
                backbone,
                columns,
                mtime=path.stat().st_mtime,
            )
        )
    return entries


def _evaluate_entry(path: Path, results: dict[str, Any]) -> ResultEntry:
    val_root = Path(str((results.get("val") or {}).get("root", "val")))
    label = val_root.parent.name if val_root.name.lower() in ("val", "valid", "validation", "test") else val_root.name
    columns: dict[str, tuple[float | None, float | None, int]] = {
        f"knn[{label}]:top1 (DINO k-NN)": (results.get("knn_top1"), None, 1),
    }
    if results.get("linear_probe_accuracy") is not None:
        columns[f"linear_probe[{label}]:accuracy (logistic)"] = (results["linear_probe_accuracy"], None, 1)
    if results.get("dino_linear_accuracy") is not None:
        columns[f"linear_probe[{label}]:accuracy (DINO linear)"] = (results["dino_linear_accuracy"], None, 1)
    backbone = str(results.get("timm_name") or results.get("backbone") or "?")
    return ResultEntry(path, "evaluate", results.get("weights"), None, backbone, columns, mtime=path.stat().st_mtime)


def find_results(dirs: Sequence[Path]) -> tuple[list[ResultEntry], list[str]]:
    """Every finetune / evaluate ``results.json`` under ``dirs``; also the unreadable ones (as messages)."""
    entries, problems = [], []
    for d in _walk(dirs):
        path = d / "results.json"
        if not path.is_file():
            continue
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            problems.append(f"{path}: unreadable ({type(err).__name__}: {err}), skipped")
            continue
        if not isinstance(results, dict):
            problems.append(f"{path}: not a results object, skipped")
        elif results.get("kind") == "finetune" or "variants" in results:
            entries.extend(_finetune_entries(path, results))
        elif "knn_top1" in results:
            entries.append(_evaluate_entry(path, results))
    return entries, problems


def _candidates(weights: str, result_file: Path) -> list[str]:
    p = Path(weights).expanduser()
    if p.is_absolute():
        return [str(p.resolve())]
    out = [str((Path.cwd() / p).resolve())]
    out += [str((parent / p).resolve()) for parent in result_file.parents]
    return out


def match_results(runs: Sequence[PretrainRun], entries: Sequence[ResultEntry]) -> None:
    """Set ``entry.run`` for the results made with a run's teacher (sha256 first, then path)."""
    by_sha = {sha: r for r in runs for sha in r.teachers.values() if sha}
    by_path = {p: r for r in runs for p in r.teachers}
    for e in entries:
        if e.weights is None:
            continue
        if e.weights_sha256 and e.weights_sha256 in by_sha:
            e.run = by_sha[e.weights_sha256]
            continue
        for cand in _candidates(str(e.weights), e.source):
            if cand in by_path:
                e.run = by_path[cand]
                break

"""``python -m surgenet_ssl.finetune``: the whole downstream run described by ``surgenet_ssl/configs/finetune.yaml``.

For every weights variant (the given weights and, on request, a random-init baseline) and every seed: build the
FPN / classifier through the one weight loader, fine-tune with Lightning (DDP and mixed precision like training),
evaluate the full validation split once in one process, and aggregate mean and std over the seeds.

Bad input (missing folders, masks that do not fit, unknown labels, an empty split, weights for another backbone)
fails before anything is trained or written. Everything a run writes goes to ``<output>/.partial`` first and is moved
into ``<output>`` when all runs are done, ``results.json`` last (atomically): a failed or killed run leaves no
results behind.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from surgenet_ssl.runtime.io_utils import atomic_path, save_torch, sha256_file

from .classification_data import CHOLEC80_PHASES, ClassificationDataset, ClsSample, load_classification_split
from .fractions import official_fraction, select_fraction
from .metrics import metric_conventions, nan_to_none
from .segmentation_data import MaskReader, SegmentationDataset, load_segmentation_split
from .transforms import SegmentationTransform, as_size, classification_transform
from .video_sets import apply_split_defaults

__all__ = [
    "run_finetune",
    "prepare_data",
    "resolve_variants",
    "find_demo_teacher",
    "apply_demo_defaults",
    "aggregate_runs",
    "PRIMARY_METRIC",
]

log = logging.getLogger("surgenet_ssl.finetune")

PRIMARY_METRIC = {"segmentation": "mIoU", "classification": "macro_f1", "multilabel": "mAP"}
_STAGING = ".partial"


# ----------------------------------------------------------------------------------------------------- config
def _flatten(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict) and node:
        out = []
        for k, v in node.items():
            out.extend(_flatten(v, f"{prefix}{k}."))
        return out
    return [(prefix[:-1], node)]


def user_override_keys(overrides: Sequence[str] | None = None) -> set[str]:
    """Keys set on the command line (``a.b=1``, ``+a.b=1``, ``group=option``); from Hydra when not given."""
    if overrides is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        except Exception:  # noqa: BLE001 - outside a Hydra app: no command line
            overrides = []
    return {str(o).split("=", 1)[0].lstrip("+~").strip() for o in overrides if "=" in str(o)}


def apply_demo_defaults(cfg: DictConfig, user_keys: set[str]) -> list[str]:
    """Apply the task's ``demo`` block (short schedule, small images) to ``cfg``, except what the user set."""
    block = OmegaConf.to_container(cfg.get("demo") or {}, resolve=False)
    applied = []
    for key, value in _flatten(block):
        if any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in user_keys):
            continue
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        applied.append(f"{key}={value}")
    return applied


# ------------------------------------------------------------------------------------------------------- data
@dataclass
class PreparedData:
    task: str  # segmentation | classification
    fmt: str
    train: SegmentationDataset | ClassificationDataset
    val: SegmentationDataset | ClassificationDataset
    class_names: list[str]
    multilabel: bool
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def metric(self) -> str:
        return PRIMARY_METRIC["multilabel" if self.multilabel else self.task]


def _split_by_groups(samples: list, val_groups: Sequence[str], where: str) -> tuple[list, list]:
    wanted = {str(g) for g in val_groups}
    found = {s.group for s in samples}
    unknown = sorted(wanted - found)
    if unknown:
        raise ValueError(
            f"data.val_groups {unknown} are not videos/cases of {where} (found: {sorted(map(str, found))[:10]})."
        )
    return [s for s in samples if s.group not in wanted], [s for s in samples if s.group in wanted]


def _group_summary(samples) -> dict[str, Any]:
    groups = [s.group for s in samples]
    known = [g for g in groups if g is not None]
    return {"samples": len(samples), "videos": len(set(known)) if known else None}


def _take_fraction(cfg: DictConfig, samples: list, strata=None) -> tuple[list, dict]:
    official = official_fraction(cfg.data, samples)  # a set's published label fraction, where it has one
    if official is not None:
        return official
    fraction = float(cfg.data.train_fraction)
    keep, by = select_fraction(
        [s.key for s in samples], fraction, [s.group for s in samples], strata, str(cfg.data.fraction_by)
    )
    info = {
        "train_fraction": fraction,
        "fraction_by": by,
        "train_samples_total": len(samples),
        "train_samples_used": len(keep),
    }
    if by == "group":
        info["train_videos_used"] = sorted({samples[i].group for i in keep})
    return keep, info


def _prepare_segmentation(cfg: DictConfig) -> PreparedData:
    d = cfg.data
    train_samples, classes, kind, fmt = load_segmentation_split(
        str(d.train), str(d.format), d.get("classes"), str(d.cholecseg8k_mask)
    )
    if d.get("val"):
        val_samples, val_classes, _, _ = load_segmentation_split(
            str(d.val), fmt, d.get("classes"), str(d.cholecseg8k_mask)
        )
        if list(val_classes) != list(classes):
            raise ValueError(f"{d.val} has other class names than {d.train}: {val_classes} vs {classes}.")
    elif d.get("val_groups"):
        train_samples, val_samples = _split_by_groups(train_samples, d.val_groups, str(d.train))
    else:
        raise ValueError(
            "missing validation data: pass data.val=DIR, or data.val_groups=[video,...] to hold out "
            "videos of data.train."
        )
    if len(classes) < 2:
        raise ValueError(f"{d.train}: segmentation needs at least 2 classes, got {classes}.")
    keep, fraction_info = _take_fraction(cfg, train_samples)
    train_samples = [train_samples[i] for i in keep]
    size, ignore = as_size(d.image_size), int(d.ignore_index)
    if size[0] % 32 or size[1] % 32:
        raise ValueError(f"data.image_size={list(size)}: height and width must be divisible by 32 for the FPN.")
    reader = MaskReader(kind, len(classes), ignore)
    aug = d.augment
    train_tf = SegmentationTransform(
        size, True, tuple(aug.scale), float(aug.hflip), float(aug.vflip), float(aug.color_jitter), ignore
    )
    train = SegmentationDataset(train_samples, classes, reader, train_tf, str(d.train))
    val = SegmentationDataset(
        val_samples, classes, reader, SegmentationTransform(size, False, ignore_index=ignore), str(d.val or d.train)
    )
    summary = {
        "format": fmt,
        "train": {"root": str(d.train), **_group_summary(train_samples)},
        "val": {"root": str(d.val or d.train), **_group_summary(val_samples)},
        **fraction_info,
    }
    if d.validate:
        t0 = time.perf_counter()
        summary["train"]["pixels_per_class"] = train.validate()
        summary["val"]["pixels_per_class"] = val.validate()
        log.info("checked %d masks in %.1f s", len(train) + len(val), time.perf_counter() - t0)
        absent = [c for c in classes if summary["train"]["pixels_per_class"][c] == 0]
        if absent:
            log.warning("classes without training pixels (after data.train_fraction): %s", ", ".join(absent))
    return PreparedData("segmentation", fmt, train, val, list(classes), False, summary)


def _class_names(cfg: DictConfig, samples: Sequence[ClsSample], fmt: str) -> list[str]:
    if cfg.data.get("classes"):
        return [str(c) for c in cfg.data.classes]
    labels = {str(s.target) for s in samples}
    if fmt in ("cholec80", "cholec80_phase", "heichole_phase") and labels <= set(CHOLEC80_PHASES):
        return list(CHOLEC80_PHASES)
    if all(lbl.lstrip("-").isdigit() for lbl in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _targets(samples: Sequence[ClsSample], classes: list[str] | None, where: str) -> list:
    if classes is None:
        return [tuple(s.target) for s in samples]
    index = {c: i for i, c in enumerate(classes)}
    for s in samples:
        if str(s.target) not in index:
            raise ValueError(
                f"{where}: label {s.target!r} of {s.path} is not a known class {classes}. Use the "
                "training classes (or list them all with data.classes=[...])."
            )
    return [index[str(s.target)] for s in samples]


def _prepare_classification(cfg: DictConfig) -> PreparedData:
    d = cfg.data
    train_samples, criteria, fmt = load_classification_split(d, "train")
    if d.get("val"):
        val_cfg = OmegaConf.merge(d, {"format": fmt})
        val_samples, val_criteria, _ = load_classification_split(val_cfg, "val")
        if val_criteria != criteria:
            raise ValueError(
                f"{d.val} has labels {val_criteria or 'single-label'} but {d.train} has "
                f"{criteria or 'single-label'}: use the same label columns."
            )
    elif d.get("val_groups"):
        train_samples, val_samples = _split_by_groups(train_samples, d.val_groups, str(d.train))
    else:
        raise ValueError(
            "missing validation data: pass data.val=CSV|DIR, or data.val_groups=[video,...] to hold "
            "out videos of data.train."
        )
    multilabel = criteria is not None
    classes = list(criteria) if criteria is not None else _class_names(cfg, train_samples, fmt)
    if not multilabel and len(classes) < 2:
        raise ValueError(f"{d.train}: classification needs at least 2 classes, found {classes}.")
    train_targets = _targets(train_samples, None if multilabel else classes, str(d.train))
    val_targets = _targets(val_samples, None if multilabel else classes, str(d.val or d.train))
    keep, fraction_info = _take_fraction(cfg, train_samples, None if multilabel else train_targets)
    train_samples = [train_samples[i] for i in keep]
    train_targets = [train_targets[i] for i in keep]
    if not val_samples:
        raise ValueError(f"Empty split: no validation samples in {d.val or d.train}.")
    aug = d.augment
    size = as_size(d.image_size)
    train = ClassificationDataset(
        train_samples,
        train_targets,
        classification_transform(
            size, True, float(aug.hflip), float(aug.vflip), float(aug.color_jitter), tuple(aug.crop_scale)
        ),
    )
    val = ClassificationDataset(val_samples, val_targets, classification_transform(size, False))
    if d.validate:
        train.check_files()
        val.check_files()

    def distribution(targets):
        if multilabel:
            arr = np.array(targets)
            return {c: int(arr[:, k].sum()) for k, c in enumerate(classes)}
        return {c: int(sum(1 for t in targets if t == k)) for k, c in enumerate(classes)}

    summary = {
        "format": fmt,
        "multilabel": multilabel,
        "train": {"root": str(d.train), **_group_summary(train_samples), "per_class": distribution(train_targets)},
        "val": {"root": str(d.val or d.train), **_group_summary(val_samples), "per_class": distribution(val_targets)},
        **fraction_info,
    }
    missing = [c for c, n in summary["train"]["per_class"].items() if n == 0]
    if missing:
        log.warning("classes without training samples (after data.train_fraction): %s", ", ".join(missing))
    return PreparedData("classification", fmt, train, val, classes, multilabel, summary)


def prepare_data(cfg: DictConfig) -> PreparedData:
    task = cfg.task.name
    for key in ("train",):
        if not cfg.data.get(key):
            raise ValueError(f"missing data.{key}")
    if task == "segmentation":
        return _prepare_segmentation(cfg)
    if task == "classification":
        return _prepare_classification(cfg)
    raise ValueError(f"task={task} is not a downstream task (segmentation, classification)")


def collate_eval_segmentation(batch):
    """Images resized to one size are stacked; masks keep their original sizes (a list)."""
    xs, ys, idx = zip(*batch, strict=True)
    return torch.stack(xs), list(ys), torch.tensor(idx)


# ---------------------------------------------------------------------------------------------------- weights
def find_demo_teacher(cfg: DictConfig) -> Path | None:
    """Newest demo teacher of this backbone under ``demo_runs_dir`` (``outputs/demo_<backbone>/<time>/export``)."""
    root = Path(str(cfg.demo_runs_dir)).expanduser()
    name, timm_name = cfg.backbone.name, cfg.backbone.get("timm_name")
    found = []
    for path in root.glob(f"demo_{name}/*/export/*_teacher.pth"):
        if name == "timm":
            try:
                run_cfg = OmegaConf.load(path.parent.parent / "config.yaml")
                if run_cfg.backbone.get("timm_name") != timm_name:
                    continue
            except Exception:  # noqa: BLE001 - a run without a readable config cannot be matched
                continue
        found.append(path)
    return max(found, key=lambda p: (p.stat().st_mtime, str(p))) if found else None


def resolve_variants(cfg: DictConfig, demo: bool) -> list[tuple[str, str | None]]:
    """``[(variant name, weights or None)]``: the given weights, plus the random-init baseline when asked."""
    weights = cfg.weights
    if isinstance(weights, str) and weights.lower() in ("null", "none", ""):
        weights = None
    if weights == "auto":
        if not demo:
            raise ValueError(
                "weights=auto only finds the demo teacher (runs on the demo data). Pass weights=PATH (an export, a "
                "published SurgeNet file, any checkpoint the loader reads) or weights=null."
            )
        teacher = find_demo_teacher(cfg)
        if teacher is None:
            raise FileNotFoundError(
                f"No demo teacher found for backbone={cfg.backbone.name} under "
                f"{Path(str(cfg.demo_runs_dir)) / f'demo_{cfg.backbone.name}'}/*/export/. Pretrain one first with "
                f"`python -m surgenet_ssl.train backbone={cfg.backbone.name}` (2-3 minutes on 2 CPU cores), or pass "
                "weights=PATH, or weights=null for random init only."
            )
        weights = str(teacher)
    baseline = cfg.random_init_baseline
    baseline = demo if str(baseline) == "auto" else bool(baseline)
    variants: list[tuple[str, str | None]] = []
    if weights is not None:
        variants.append(("pretrained", str(weights)))
    if weights is None or baseline:
        variants.append(("random_init", None))
    return variants


def build_model(cfg: DictConfig, data: PreparedData, weights: str | None) -> tuple[torch.nn.Module, str]:
    from surgenet_ssl.backbones.options import backbone_options
    from surgenet_ssl.models import BackboneFPN, build_classifier

    name = cfg.backbone.name
    options = backbone_options(cfg.backbone)
    variant = cfg.get("pretrained_variant") or options.pop("pretrained_variant", None)
    options.pop("pretrained_variant", None)
    options["drop_path_rate"] = float(cfg.model.drop_path_rate)
    model: torch.nn.Module
    try:
        if data.task == "segmentation":
            model = BackboneFPN(name, len(data.class_names), pretrained=variant, pretrained_weights=weights, **options)
        else:
            if name == "caformer_s18" and cfg.task.mode == "linear":
                options.setdefault("use_mlp_head", False)  # a linear probe is linear: no MLP head
            model = build_classifier(
                name, len(data.class_names), pretrained=variant, pretrained_weights=weights, **options
            )
    except ValueError as err:
        if weights is None:
            raise
        shown = cfg.backbone.get("timm_name") or name
        raise ValueError(f"weights={weights} cannot be loaded into backbone={shown}: {err}") from err
    report = getattr(model, "load_report", None)
    return model, str(report) if report is not None else "random initialisation"


# ------------------------------------------------------------------------------------------------------ runs
def aggregate_runs(runs: Sequence[dict]) -> tuple[dict, dict]:
    """Mean and sample std (ddof=1; None with one seed) over seeds of every scalar metric and per-class dict, also
    inside nested blocks (``per_video``: ``strict`` / ``relaxed``)."""

    def stats(values):
        arr = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
        finite = arr[~np.isnan(arr)]
        m = float(finite.mean()) if finite.size else float("nan")
        s = float(finite.std(ddof=1)) if finite.size >= 2 else None
        return m, s

    def walk(blocks: list[dict]) -> tuple[dict, dict]:
        mean: dict[str, Any] = {}
        std: dict[str, Any] = {}
        for key, value in blocks[0].items():
            if key in ("confusion_matrix", "pixels", "samples", "support", "positives", "per_video_accuracy"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
                continue
            if isinstance(value, (int, float)):
                mean[key], std[key] = stats([b[key] for b in blocks])
            elif value and all(isinstance(v, (int, float)) or v is None for v in value.values()):
                mean[key], std[key] = {}, {}
                for cls in value:
                    mean[key][cls], std[key][cls] = stats([b[key][cls] for b in blocks])
            elif value:
                mean[key], std[key] = walk([b[key] for b in blocks])
        return mean, std

    return walk([r["metrics"] for r in runs])


def _loggers(cfg: DictConfig, run_dir: Path, run_label: str) -> list:
    import hydra

    from surgenet_ssl.training.trainer import wandb_offline

    out = []
    for name, node in (cfg.get("logger") or {}).items():
        if not node or "_target_" not in node:
            continue
        extra: dict[str, Any] = {"save_dir": str(run_dir)}
        if name == "wandb":
            os.environ.setdefault("WANDB_SILENT", "true")
            extra |= {"name": f"{cfg.run_name}/{run_label}", "id": secrets.token_hex(4), "offline": wandb_offline(node)}
        out.append(hydra.utils.instantiate(node, **extra))
    return out


def _finish_loggers(loggers: list) -> None:
    for lg in loggers:
        if type(lg).__name__.endswith("WandbLogger") and getattr(lg, "_experiment", None) is not None:
            try:
                lg.experiment.finish()
            except Exception as err:  # noqa: BLE001 - a logging backend must not fail the results
                log.warning("could not close the wandb run: %s", err)


def _worker_init(_: int) -> None:
    from surgenet_ssl.runtime.resources import limit_worker_threads

    limit_worker_threads()


def _loaders(cfg: DictConfig, data: PreparedData, workers: int) -> tuple[DataLoader, DataLoader]:
    batch = int(cfg.data.batch_size)
    eval_batch = int(cfg.data.get("eval_batch_size") or batch)
    common: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": False,
        "worker_init_fn": _worker_init if workers else None,
    }
    train = DataLoader(data.train, batch_size=batch, shuffle=True, drop_last=len(data.train) > batch, **common)
    collate = collate_eval_segmentation if data.task == "segmentation" else None
    val = DataLoader(data.val, batch_size=eval_batch, shuffle=False, collate_fn=collate, **common)
    return train, val


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None
    precision = str(precision)
    return torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None


def _train_one(
    cfg: DictConfig,
    data: PreparedData,
    variant: str,
    weights: str | None,
    seed: int,
    run_dir: Path,
    workers: int,
    overlay_count: int,
) -> dict | None:
    import hydra
    import pytorch_lightning as pl

    from surgenet_ssl.training.trainer import build_strategy, trainer_kwargs

    from .module import FinetuneModule, evaluate_model

    pl.seed_everything(seed, workers=True)
    model, loaded = build_model(cfg, data, weights)
    train_loader, val_loader = _loaders(cfg, data, workers)
    module = FinetuneModule(
        model,
        data.task,
        data.class_names,
        data.multilabel,
        str(cfg.task.mode),
        cast(dict, OmegaConf.to_container(cfg.optim, resolve=True)),  # a mapping
        int(cfg.data.ignore_index),
    )
    kwargs = trainer_kwargs(cfg.trainer)
    kwargs.pop("default_root_dir", None)
    validate_every = int(kwargs.get("check_val_every_n_epoch") or 0)
    kwargs["check_val_every_n_epoch"] = max(1, validate_every)  # 0: no val loader is given (Lightning needs >= 1)
    loggers = _loggers(cfg, run_dir, f"{variant}/seed{seed}")
    trainer: pl.Trainer = hydra.utils.instantiate(
        OmegaConf.create({"_target_": cfg.trainer._target_, **kwargs}),
        strategy=build_strategy(cfg),
        callbacks=[],
        logger=loggers or False,
        default_root_dir=str(run_dir),
    )
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader if validate_every else None)
    seconds = time.perf_counter() - t0
    _finish_loggers(loggers)
    if not trainer.is_global_zero:
        return None
    device = trainer.strategy.root_device
    metrics, kept = evaluate_model(
        module.model,
        val_loader,
        data.task,
        data.class_names,
        data.multilabel,
        device,
        int(cfg.data.ignore_index),
        _autocast_dtype(cfg.trainer.precision, device),
        keep=overlay_indices(len(data.val), overlay_count),
        options=metric_options(cfg, data),
    )
    if cfg.get("save_weights"):
        with atomic_path(run_dir / "model.pth") as tmp:
            save_torch({k: v.detach().cpu() for k, v in module.model.state_dict().items()}, tmp)
    return {
        "seed": seed,
        "metrics": metrics,
        "weights_loaded": loaded,
        "train_seconds": round(seconds, 2),
        "epochs": int(trainer.current_epoch),
        "optimizer_steps": int(trainer.global_step),
        "device": str(device),
        "kept": kept,
    }


def per_video_wanted(cfg: DictConfig, data: PreparedData) -> bool:
    """``metrics.per_video``: auto -> single-label classification whose validation frames all name their video."""
    wanted = (cfg.get("metrics") or {}).get("per_video", "auto")
    if data.task != "classification" or data.multilabel or wanted in (False, None) or str(wanted) == "false":
        return False
    samples = cast(ClassificationDataset, data.val).samples
    has_videos = all(s.group is not None for s in samples)
    if str(wanted) != "auto" and not has_videos:
        raise ValueError(
            "metrics.per_video=true needs the video of every validation frame (a video column in the CSV, or the "
            "Cholec80 layout); set metrics.per_video=auto or false."
        )
    return has_videos


def metric_options(cfg: DictConfig, data: PreparedData) -> dict[str, Any]:
    """The ``metrics`` config as :func:`evaluate_model` options (per-video: each validation frame's video and name)."""
    m = cfg.get("metrics") or {}
    if str(m.get("absent_labels", "zero")) not in ("zero", "skip"):
        raise ValueError(f"metrics.absent_labels={m.get('absent_labels')}: choose zero (scikit-learn) or skip.")
    options: dict[str, Any] = {
        "absent_labels": str(m.get("absent_labels", "zero")),
        "per_image_dice": bool(m.get("per_image_dice", False)),
    }
    if per_video_wanted(cfg, data):
        samples = cast(ClassificationDataset, data.val).samples
        options |= {
            "videos": [s.group for s in samples],
            "keys": [s.key for s in samples],
            "fps": float(cfg.data.get("frames_fps") or 1.0),
            "boundary_seconds": float(m.get("boundary_seconds", 10.0)),
        }
    return options


def overlay_indices(n: int, count: int) -> list[int]:
    """``count`` validation images spread evenly over the split (its cases), away from its first and last frame."""
    if count <= 0 or n == 0:
        return []
    return sorted({min(n - 1, int((k + 0.5) * n / count)) for k in range(count)})


def _overlay(data: PreparedData, kept: list, path: Path, title: str) -> Path:
    from .overlays import save_overlays

    val = data.val
    assert isinstance(val, SegmentationDataset)  # predictions are kept for segmentation only
    items = []
    for i, pred in kept:
        image, mask = val.load(i)
        items.append((image, mask, pred.numpy(), Path(val.samples[i].key).name))
    return save_overlays(path, items, data.class_names, int(val.reader.ignore_index), title)


def _move_into(staging: Path, output: Path) -> None:
    for item in sorted(staging.iterdir()):
        dest = output / item.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif dest.exists():
            dest.unlink()
        os.replace(item, dest)


def _is_rank_zero() -> bool:
    from surgenet_ssl.runtime.cluster import is_global_rank_zero

    return is_global_rank_zero()


def run_finetune(cfg: DictConfig, overrides: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run everything ``cfg`` asks for; returns the results dict (None on ranks other than 0)."""
    start = time.perf_counter()
    task = cfg.task.name
    if task not in ("segmentation", "classification"):
        raise ValueError(f"task={task}: choose task=segmentation or task=classification")
    demo = not cfg.data.get("train")
    applied: list[str] = []
    if demo:
        from surgenet_ssl.data.demo_labels import ensure_demo_labels

        applied = apply_demo_defaults(cfg, user_override_keys(overrides))
        root = ensure_demo_labels(cfg.paths.cache_dir)
        if task == "segmentation":
            paths = {"train": root / "segmentation" / "train", "val": root / "segmentation" / "val", "format": "folder"}
        else:
            paths = {"train": root / "phases" / "train.csv", "val": root / "phases" / "val.csv", "format": "csv"}
        for key, value in paths.items():
            OmegaConf.update(cfg, f"data.{key}", str(value), merge=False)
        log.info("demo: %s data in %s; demo settings %s", task, root, ", ".join(applied) or "none")
    elif not apply_split_defaults(cfg.data) and not cfg.data.get("val") and not cfg.data.get("val_groups"):
        raise ValueError(
            "missing data.val (or data.val_groups). Usage: python -m surgenet_ssl.finetune task=NAME "
            "weights=PATH|null backbone=NAME data.train=DIR|CSV data.val=DIR|CSV"
        )
    seeds = [int(s) for s in (cfg.seeds if OmegaConf.is_list(cfg.seeds) else [cfg.seeds])]
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed, e.g. seeds=[0,1,2]")

    # everything that can be wrong with the input fails here, before training or writing anything
    data = prepare_data(cfg)  # first: bad data fails in seconds, before Lightning is even imported
    metric_options(cfg, data)  # and bad metrics.* settings
    from surgenet_ssl.runtime.io_utils import check_writable
    from surgenet_ssl.runtime.resources import apply_torch_threads
    from surgenet_ssl.training.trainer import check_devices, silence_benign_warnings

    silence_benign_warnings()
    import warnings

    # check_val_every_n_epoch=0 runs no validation loop on purpose; the final evaluation always runs
    warnings.filterwarnings("ignore", message=r"You defined a `validation_step` but have no `val_dataloader`")
    # validation metrics are summed over ranks by the module itself (confusion matrices), not by self.log
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(val|train)/")
    check_devices(cfg.trainer)
    variants = resolve_variants(cfg, demo)
    for _, weights in variants:  # weights that do not fit the backbone: now, not after the first variant
        if weights is not None:
            build_model(cfg, data, weights)
    output = Path(str(cfg.output))
    rank_zero = _is_rank_zero()
    if rank_zero:
        check_writable(output)
    staging = output / _STAGING
    if rank_zero:
        shutil.rmtree(staging, ignore_errors=True)
    workers = cfg.data.num_workers
    workers = int(workers) if workers is not None else 0
    apply_torch_threads(cfg.data.get("torch_threads"), workers, cfg.trainer, rank_zero)
    log.info(
        "%s (%s): %d train / %d val samples, %d classes; variants %s; seeds %s",
        task,
        data.fmt,
        len(data.train),
        len(data.val),
        len(data.class_names),
        [v for v, _ in variants],
        seeds,
    )

    try:
        results_variants: dict[str, Any] = {}
        overlays: dict[str, str] = {}
        for variant, weights in variants:
            runs = []
            for n, seed in enumerate(seeds):
                run_dir = staging / "runs" / variant / f"seed{seed}"
                keep = int(cfg.overlays) if (data.task == "segmentation" and n == 0) else 0
                run = _train_one(cfg, data, variant, weights, seed, run_dir, workers, keep)
                if run is None:
                    continue
                kept = run.pop("kept")
                value = run["metrics"].get(data.metric, float("nan"))
                if kept:
                    title = f"{variant} (seed {seed}): {data.metric} {value:.3f}"
                    png = _overlay(data, kept, staging / "overlays" / f"{variant}.png", title)
                    overlays[variant] = str(Path("overlays") / png.name)
                log.info("%s seed %d: %s=%.4f", variant, seed, data.metric, value)
                runs.append(run)
            if not rank_zero:
                continue
            mean, std = aggregate_runs(runs)
            results_variants[variant] = {
                "weights": str(Path(weights).resolve()) if weights and Path(weights).is_file() else weights,
                "weights_sha256": sha256_file(weights) if weights and Path(weights).is_file() else None,
                "weights_loaded": runs[0]["weights_loaded"],
                "mean": mean,
                "std": std,
                "runs": runs,
            }
        if not rank_zero:
            return None
        metric = data.metric
        summary = {
            v: {metric: {"mean": r["mean"].get(metric), "std": r["std"].get(metric), "n": len(r["runs"])}}
            for v, r in results_variants.items()
        }
        options = metric_options(cfg, data)
        results = {
            "kind": "finetune",
            "task": "multilabel_classification" if data.multilabel else task,
            "mode": str(cfg.task.mode),
            "primary_metric": metric,
            "metrics": metric_conventions(
                data.task,
                data.multilabel,
                options["absent_labels"],
                per_video="videos" in options,
                per_image_dice=options["per_image_dice"],
            ),
            "summary": summary,
            "backbone": cfg.backbone.name,
            "timm_name": cfg.backbone.get("timm_name"),
            "demo": demo,
            "demo_settings": applied,
            "data": data.summary,
            "class_names": data.class_names,
            "seeds": seeds,
            "variants": results_variants,
            "overlays": overlays,
            "device": next((r["runs"][0]["device"] for r in results_variants.values() if r["runs"]), None),
            "seconds": round(time.perf_counter() - start, 1),
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        results = nan_to_none(results)
        with atomic_path(staging / "results.json") as tmp:
            tmp.write_text(json.dumps(results, indent=2))
        _move_into(staging, output)
        return results
    finally:
        if rank_zero:
            shutil.rmtree(staging, ignore_errors=True)


def format_summary(results: dict[str, Any]) -> list[str]:
    """The comparison table printed at the end of a run (the primary metric named with its convention), and the
    per-video phase figures when they were computed."""
    metric = results["primary_metric"]
    tag = ((results.get("metrics") or {}).get("convention") or {}).get(metric)
    named = f"{metric} [{tag}]" if tag else metric
    lines = [f"{'variant':<14} {named + ' (mean +- std over ' + str(len(results['seeds'])) + ' seed(s))':<46} weights"]
    for variant, info in results["variants"].items():
        m, s = info["mean"].get(metric), info["std"].get(metric)
        value = "n/a" if m is None else f"{m:.4f}" + (f" +- {s:.4f}" if s is not None else "")
        lines.append(f"{variant:<14} {value:<46} {info['weights'] or '-'}")
    for variant, info in results["variants"].items():
        video = info["mean"].get("per_video")
        if not video:
            continue
        parts = [
            f"{kind} accuracy {video[kind]['accuracy']:.4f}, Jaccard {video[kind]['jaccard']:.4f}, "
            f"F1 {video[kind]['f1']:.4f}"
            for kind in ("strict", "relaxed")
            if video.get(kind) and None not in (video[kind].get("accuracy"), video[kind].get("jaccard"))
        ]
        lines.append(f"{variant:<14} per-video (Cholec80): " + "; ".join(parts))
    return lines

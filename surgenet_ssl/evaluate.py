"""Evaluate a backbone on a labelled image folder: ``python -m surgenet_ssl.evaluate``.

    python -m surgenet_ssl.evaluate weights=PATH backbone=NAME data.train=DIR data.val=DIR [output=DIR]

Loads any weights ``load_backbone_weights`` understands (or ``weights=null``: random init, a baseline), extracts
frozen pooled features of both folders, and reports DINO's weighted k-NN top-1/top-5 (train = memory, val =
queries), a linear-probe accuracy (``protocol``: ``logistic``, the standardised L-BFGS logistic regression;
``dino_linear``, DINO's linear evaluation; or ``both``), a t-SNE map (``embedding_map.png``) and ``results.json`` in
``output`` (its ``metrics`` block names the convention of each number).
With ``baseline=random`` (the default) the same backbone at random initialisation (seeded by ``seed``) is scored
too, and both and the gain are printed (and stored under ``baseline`` / ``gain``): a number only means something
next to what the architecture gives without any training. The last line printed is ``knn_top1=<float>`` (a
fraction in [0, 1], for the weights). Bad input (missing folders, fewer than
2 classes, weights for another backbone) ends with a one-paragraph error and exit status 1.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

from surgenet_ssl.config.dirs import CONFIG_DIR
from surgenet_ssl.runtime.io_utils import check_writable

# torch and surgenet_ssl.evaluation (torchvision, sklearn, matplotlib) take seconds to import: they are imported
# inside the functions that use them, so that `--cfg job`, Hydra's errors and missing settings answer at once.
if TYPE_CHECKING:
    import torch

    from surgenet_ssl.evaluation import ImageFolderDataset

log = logging.getLogger(__name__)


def build_model(cfg: DictConfig) -> tuple[torch.nn.Module, str]:
    """The backbone with ``cfg.weights`` loaded (through the one weight loader); returns it and a load summary."""
    from surgenet_ssl.backbones import build_backbone
    from surgenet_ssl.backbones.options import backbone_options
    from surgenet_ssl.models import build_classifier

    name = cfg.backbone.name
    timm_kwargs = backbone_options(cfg.backbone)
    # a variant given as a backbone option in training (+backbone.pretrained_variant=...) is the default here
    trained_variant = timm_kwargs.pop("pretrained_variant", None)
    if cfg.weights is None:
        variant = cfg.get("pretrained_variant") or trained_variant or "SurgeNet"
        model = build_backbone(name, pretrained_variant=variant, **timm_kwargs)
        return model, "random initialisation (weights=null)"
    # build_classifier reads the file once, infers the CaFormer variant when pretrained_variant is null and loads
    # through load_backbone_weights, which raises (never silently loads nothing) on a mismatch.
    try:
        model = build_classifier(
            name,
            num_classes=0,
            pretrained=cfg.get("pretrained_variant") or trained_variant,
            pretrained_weights=str(cfg.weights),
            **timm_kwargs,
        )
    except ValueError as err:
        shown = cfg.backbone.get("timm_name") or name
        raise ValueError(
            f"weights={cfg.weights} cannot be loaded into backbone={shown}: {err} If the file was trained with "
            "another backbone, pass that one (backbone=caformer_s18 | convnextv2_tiny | pvt_v2_b2 | vit_small | "
            "timm backbone.timm_name=NAME), with the backbone.* options it was trained with (+backbone.KEY=VALUE)."
        ) from err
    return model, str(getattr(model, "load_report", f"loaded {cfg.weights}"))


def build_random_model(cfg: DictConfig, like: torch.nn.Module | None = None) -> torch.nn.Module:
    """The same architecture as ``like`` (the loaded model; for caformer_s18 the same ReLU/StarReLU variant) at
    random initialisation, seeded by ``cfg.seed``: the ``baseline=random`` reference."""
    import torch

    from surgenet_ssl.backbones import build_backbone
    from surgenet_ssl.backbones.options import backbone_options
    from surgenet_ssl.models.classification import resolve_caformer_variant

    timm_kwargs = backbone_options(cfg.backbone)
    trained_variant = timm_kwargs.pop("pretrained_variant", None)
    variant = cfg.get("pretrained_variant") or trained_variant
    if variant is None:
        variant = resolve_caformer_variant(None, like.state_dict()) if like is not None else "SurgeNet"
    torch.manual_seed(int(cfg.seed))
    return build_backbone(cfg.backbone.name, pretrained_variant=variant, **timm_kwargs)


def baseline_mode(cfg: DictConfig) -> str | None:
    """``baseline``: ``random`` (default) or off (``null``/``none``/``false``)."""
    value = cfg.get("baseline", "random")
    if value in (None, False) or str(value).lower() in ("none", "null", "false", "off", ""):
        return None
    if str(value).lower() != "random":
        raise ValueError(f"baseline={value} is not supported: use baseline=random (the default) or baseline=null.")
    return "random"


def protocols(cfg: DictConfig) -> tuple[bool, bool]:
    """``protocol``: ``(logistic, dino_linear)`` to run; logistic | dino_linear | both."""
    value = str(cfg.get("protocol", "logistic")).lower()
    if value not in ("logistic", "dino_linear", "both"):
        raise ValueError(f"protocol={value}: choose logistic (the default), dino_linear or both.")
    return value in ("logistic", "both"), value in ("dino_linear", "both")


def metric_conventions(logistic: bool, dino: bool) -> dict[str, Any]:
    """The ``metrics`` block of results.json: each number -> its convention tag, and the tags' definitions."""
    from surgenet_ssl.downstream.metrics import CONVENTIONS

    tags = {"knn_top1": "DINO k-NN", "knn_top5": "DINO k-NN"}
    if logistic:
        tags["linear_probe_accuracy"] = "logistic"
    if dino:
        tags["dino_linear_accuracy"] = "DINO linear"
    return {"convention": tags, "definitions": {t: CONVENTIONS[t] for t in dict.fromkeys(tags.values())}}


def _split_summary(dataset: ImageFolderDataset, feats) -> dict[str, Any]:
    import torch

    return {
        "root": str(dataset.root),
        "images": len(feats.labels),
        "classes": len(torch.unique(feats.labels)),
        "skipped_undecodable": len(feats.failed),
        "undecodable_examples": feats.failed[:10],
        "skipped_empty_class_folders": dataset.empty_classes,
        "ignored_non_image_files": dataset.ignored_files,
    }


def _is_missing(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    return OmegaConf.is_missing(OmegaConf.select(cfg, parent) if parent else cfg, leaf)


def _with_batch_norm_statistics(model: Any, train_set: Any, loader_kw: dict[str, Any]) -> Any:
    """A random-init model, or a copy whose BatchNorm layers hold statistics estimated on the train images: scored
    with the running mean 0 / variance 1 of a fresh BatchNorm it would not be an honest baseline."""
    from torch.utils.data import DataLoader

    from surgenet_ssl.evaluation import calibrate_batch_norm, resolve_device, uncalibrated_batch_norms

    if not uncalibrated_batch_norms(model):
        return model
    loader = DataLoader(train_set, batch_size=loader_kw["batch_size"], num_workers=loader_kw["num_workers"])
    batches = (images[ok] for images, _, ok in loader)
    calibrated, layers = calibrate_batch_norm(model, batches, resolve_device(loader_kw["device"]))
    log.info(
        "random init: %d BatchNorm layer(s) never saw data; their statistics were estimated on the %d train images "
        "before scoring",
        layers,
        len(train_set),
    )
    return calibrated


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the whole evaluation described by ``cfg`` (surgenet_ssl/configs/evaluate.yaml); returns the results."""
    missing = [key for key in ("weights", "data.train", "data.val") if _is_missing(cfg, key)]
    if missing:
        raise ValueError(
            f"missing required setting(s) {', '.join(missing)}. Usage: python -m surgenet_ssl.evaluate "
            "weights=PATH|null backbone=NAME [backbone.timm_name=NAME] data.train=DIR data.val=DIR [output=DIR]"
        )
    import torch

    from surgenet_ssl.evaluation import (
        ImageFolderDataset,
        dino_linear_eval,
        extract_features,
        knn_accuracy,
        linear_probe_accuracy,
        resolve_device,
        save_embedding_map,
    )

    torch.manual_seed(int(cfg.seed))
    device = resolve_device(cfg.device)
    output = Path(cfg.output)

    # datasets first: bad folders fail before the (slow) model build
    train_set = ImageFolderDataset(cfg.data.train, cfg.data.image_size, cfg.data.get("resize_size"), min_classes=2)
    val_set = ImageFolderDataset(
        cfg.data.val, cfg.data.image_size, cfg.data.get("resize_size"), classes=train_set.classes, min_classes=1
    )
    log.info(
        "train: %d images in %d classes (%s); val: %d images",
        len(train_set),
        len(train_set.classes),
        ", ".join(train_set.classes),
        len(val_set),
    )

    check_writable(output)  # before the slow part, not after it
    baseline = baseline_mode(cfg)
    run_logistic, run_dino = protocols(cfg)
    model, load_summary = build_model(cfg)
    log.info("%s", load_summary)
    start = time.perf_counter()
    workers = cfg.data.num_workers
    if workers is None:
        workers = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    loader_kw: dict[str, Any] = dict(batch_size=int(cfg.data.batch_size), num_workers=int(workers), device=device)
    if cfg.weights is None:  # loaded weights keep the statistics they were trained with
        model = _with_batch_norm_statistics(model, train_set, loader_kw)
    train = extract_features(model, train_set, **loader_kw)
    val = extract_features(model, val_set, **loader_kw)
    extract_s = time.perf_counter() - start
    if len(torch.unique(train.labels)) < 2:
        raise ValueError(
            f"After skipping {len(train.failed)} undecodable image(s), {cfg.data.train} has images of fewer than 2 "
            "classes; fix or replace the unreadable files."
        )

    num_classes = len(train.classes)

    def score(m: Any, tr: Any, va: Any) -> dict[str, Any]:
        """k-NN top-1 / top-5 and the linear protocols asked for, of one model (the same settings for both)."""
        knn = knn_accuracy(
            tr.features,
            tr.labels,
            va.features,
            va.labels,
            num_classes,
            k=int(cfg.knn.k),
            temperature=float(cfg.knn.temperature),
        )
        out: dict[str, Any] = {"knn_top1": knn[0], "knn_top5": knn[1]}
        if run_logistic:
            out["linear_probe_accuracy"] = linear_probe_accuracy(
                tr.features,
                tr.labels,
                va.features,
                va.labels,
                C=float(cfg.linear_probe.C),
                max_iter=int(cfg.linear_probe.max_iter),
            )
        if run_dino:
            d = cfg.dino_linear
            result = dino_linear_eval(
                m,
                train_set,
                val_set,
                num_classes,
                epochs=int(d.epochs),
                batch_size=int(d.batch_size),
                lr=float(d.lr),
                n_last_blocks=int(d.n_last_blocks),
                avgpool=bool(d.avgpool),
                val_every=int(d.val_every),
                num_workers=int(workers),
                device=device,
                seed=int(cfg.seed),
            )
            out["dino_linear_accuracy"] = result.best_accuracy
            out["dino_linear"] = result.as_dict() | {"epochs": int(d.epochs), "batch_size": int(d.batch_size)}
        return out

    scores = score(model, train, val)
    reference: dict[str, Any] | None = None
    if baseline == "random" and cfg.weights is not None:  # weights=null is the random baseline itself
        random_model = _with_batch_norm_statistics(build_random_model(cfg, like=model), train_set, loader_kw)
        r_train = extract_features(random_model, train_set, **loader_kw)
        r_val = extract_features(random_model, val_set, **loader_kw)
        reference = {"weights": f"random initialisation (seed {int(cfg.seed)})", **score(random_model, r_train, r_val)}
        linear = [k for k in ("linear_probe_accuracy", "dino_linear_accuracy") if k in reference]
        log.info(
            "random-init baseline: k-NN top-1 %.4f%s",
            reference["knn_top1"],
            "".join(f", {k} {reference[k]:.4f}" for k in linear),
        )
    output.mkdir(parents=True, exist_ok=True)
    png = save_embedding_map(
        torch.cat([train.features, val.features]),
        torch.cat([train.labels, val.labels]),
        output / "embedding_map.png",
        label_names=train.classes,
        title=f"t-SNE of {cfg.backbone.get('timm_name') or cfg.backbone.name} features (train + val)",
        perplexity=float(cfg.tsne.perplexity),
        max_points=int(cfg.tsne.max_points),
        seed=int(cfg.seed),
    )
    headline = ("knn_top1", "knn_top5", "linear_probe_accuracy", "dino_linear_accuracy")
    results = {
        **scores,
        "metrics": metric_conventions(run_logistic, run_dino),
        "knn": {
            "k": int(cfg.knn.k),
            "k_used": min(int(cfg.knn.k), len(train.labels)),
            "temperature": float(cfg.knn.temperature),
        },
        "backbone": cfg.backbone.name,
        "timm_name": cfg.backbone.get("timm_name"),
        "weights": None if cfg.weights is None else str(cfg.weights),
        "weights_loaded": load_summary,
        "baseline": reference,
        "gain": None if reference is None else {k: scores[k] - reference[k] for k in headline if k in scores},
        "feature_dim": int(train.features.shape[1]),
        "class_names": train.classes,
        "train": _split_summary(train_set, train),
        "val": _split_summary(val_set, val),
        "device": str(device),
        "feature_extraction_seconds": round(extract_s, 3),
        "embedding_map": str(png),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    with open(output / "results.json", "w") as f:
        json.dump(results, f, indent=2)
    return results


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        results = evaluate(cfg)
    except (ValueError, FileNotFoundError) as err:
        # our own, actionable messages: no deep traceback for bad input
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    out = Path(cfg.output)
    print(f"results={out / 'results.json'}")
    print(f"embedding_map={results['embedding_map']}")
    linear = [k for k in ("linear_probe_accuracy", "dino_linear_accuracy") if k in results]
    for key in linear:
        print(f"{key}={results[key]:.4f}")
    print(f"knn_top5={results['knn_top5']:.4f}")
    base, gain = results.get("baseline"), results.get("gain")
    if base is not None and gain is not None:  # (both, or neither)
        for key in linear:
            print(f"random_init_{key}={base[key]:.4f}")
        print(f"random_init_knn_top1={base['knn_top1']:.4f}")
        for key in linear:
            print(f"{key.replace('_accuracy', '')}_gain={gain[key]:+.4f}")
        print(f"knn_top1_gain={gain['knn_top1']:+.4f}")
        names = {"linear_probe_accuracy": "linear probe (logistic)", "dino_linear_accuracy": "DINO linear"}
        print(
            f"k-NN top-1: {base['knn_top1']:.4f} at random init -> {results['knn_top1']:.4f} with {cfg.weights} "
            f"(gain {gain['knn_top1']:+.4f})"
            + "".join(f"; {names[k]} {base[k]:.4f} -> {results[k]:.4f}" for k in linear)
        )
    print(f"knn_top1={results['knn_top1']:.4f}", flush=True)


if __name__ == "__main__":
    main()

"""Teacher export: the weight files and model card written from a run's checkpoint, shared by the end-of-training
callback (``surgenet_ssl.callbacks.TeacherExport``) and the CLI (``python -m surgenet_ssl.export``).

From a Lightning checkpoint of a run, :func:`export_checkpoint` writes:

- ``<dataset>_<backbone>_epoch<NNNN>_teacher.pth``: flat dict of CPU tensors in SurgeNet naming (the published
  teacher format: backbone only, no head, no prefix), loadable by the published SurgeNet loaders;
- ``<dataset>_<backbone>_epoch<NNNN>_teacher.safetensors``: the same weights in timm naming;
- ``<dataset>_<backbone>_epoch<NNNN>_checkpoint.pth``: the full state in the official DINO checkpoint layout
  (``student``/``teacher`` with ``backbone.*``/``head.*``, ``optimizer``, ``epoch``, ``args``, ``dino_loss``);
- a model card (``<stem>_README.md``, and ``README.md`` for the newest export of the folder).

:func:`export_dino_checkpoint` writes the two teacher files from a full DINO checkpoint (ours or the official one).
The same checkpoint always gives the same bytes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from surgenet_ssl.backbones.convert import timm_to_surgenet
from surgenet_ssl.data.video_exclusion import load_video_exclusion
from surgenet_ssl.runtime.io_utils import atomic_path, save_torch, sha256_file

__all__ = [
    "SURGENET_NAMED",
    "completed_epochs",
    "export_checkpoint",
    "export_dino_checkpoint",
    "final_knn",
    "save_safetensors",
    "to_surgenet_naming",
    "write_model_card",
]

log = logging.getLogger(__name__)

# Backbones with a published SurgeNet naming; others are exported in timm naming in the .pth as well.
SURGENET_NAMED = ("caformer_s18", "convnextv2_tiny", "pvt_v2_b2")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` with the metadata in sorted key order.

    Why: safetensors writes ``__metadata__`` from a hash map, in a different order on each call, so exporting the
    same checkpoint twice gave different bytes (and sha256 in the model card). The tensors' order and offsets are
    already deterministic; only the header is rewritten, in place when it keeps its length.
    """
    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        meta = header.pop("__metadata__", None)
        ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | header
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:  # same content, so normally the same length: pad with JSON whitespace
            f.seek(8)
            f.write(text.ljust(size))
            return
        data = f.read()
        text = text.ljust(len(text) + (-len(text) % 8))  # the format aligns the data to 8 bytes
        f.seek(0)
        f.write(len(text).to_bytes(8, "little") + text + data)
        f.truncate()


def final_knn(checkpoint: dict) -> dict[str, Any] | None:
    """The last online k-NN result in a checkpoint (the KNNMonitor callback's saved state), or None."""
    for state in (checkpoint.get("callbacks") or {}).values():
        result = state.get("last_result") if isinstance(state, dict) else None
        if isinstance(result, dict) and "knn/top1" in result:
            return {**result, "epoch": state.get("last_epoch")}
    return None


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v.detach().cpu().contiguous().clone() for k, v in state.items() if k.startswith(prefix)}


def completed_epochs(checkpoint: dict) -> int:
    """Epochs fully trained when the checkpoint was written (what the ``epoch<NNNN>`` in file names counts).

    Lightning marks an epoch "processed" before its end-of-epoch checkpoint is written and "completed" only
    after, so ``processed`` is the count that is right for epoch-end, mid-epoch and end-of-training checkpoints.
    """
    try:
        return int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return int(checkpoint.get("epoch", 0))


def _backbone_names(checkpoint: dict) -> tuple[str, str]:
    hp = checkpoint.get("hyper_parameters") or {}
    backbone = hp.get("backbone") or {}
    name = backbone.get("name")
    if name is None:
        raise ValueError("checkpoint has no hyper_parameters.backbone.name: is it a surgenet-ssl Lightning checkpoint?")
    display = backbone.get("timm_name") or name if name == "timm" else name
    return name, display


def to_surgenet_naming(state: dict[str, torch.Tensor], backbone: str) -> dict[str, torch.Tensor]:
    """timm naming -> SurgeNet naming for the published backbones; unchanged (timm naming) for the others."""
    return timm_to_surgenet(state, backbone) if backbone in SURGENET_NAMED else dict(state)


def export_checkpoint(
    checkpoint: dict[str, Any],
    output_dir: str | Path,
    dataset: str | None = None,
    run_config: dict | None = None,
) -> dict[str, Path]:
    """Write the three artefacts (and a model card) from a Lightning checkpoint dict. Returns their paths."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict) or not any(k.startswith("teacher.backbone.") for k in state):
        raise ValueError(
            "not a surgenet-ssl Lightning checkpoint: expected 'state_dict' with 'teacher.backbone.*' keys "
            f"(top-level keys found: {sorted(checkpoint)[:10]})"
        )
    name, display = _backbone_names(checkpoint)
    run_config = run_config or checkpoint.get("run_config") or {}
    dataset = dataset or (run_config.get("dataset") or {}).get("name") or "run"
    epoch = completed_epochs(checkpoint)
    stem = f"{dataset}_{display}_epoch{epoch:04d}"
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    teacher_backbone = _sub_state(state, "teacher.backbone.")
    surgenet_backbone = to_surgenet_naming(teacher_backbone, name)
    naming = "surgenet" if name in SURGENET_NAMED else "timm"

    def dino_branch(prefix: str) -> dict[str, torch.Tensor]:
        branch = {
            f"backbone.{k}": v for k, v in to_surgenet_naming(_sub_state(state, f"{prefix}.backbone."), name).items()
        }
        branch.update({f"head.{k}": v for k, v in _sub_state(state, f"{prefix}.head.").items()})
        return branch

    args = dict(run_config) if run_config else {"hyper_parameters": checkpoint.get("hyper_parameters", {})}
    args["backbone_naming"] = naming
    dino = {
        "student": dino_branch("student"),
        "teacher": dino_branch("teacher"),
        "optimizer": (checkpoint.get("optimizer_states") or [{}])[0],
        "epoch": epoch,
        "args": args,
        "dino_loss": {"center": state["dino_loss.center"].detach().cpu().clone()},
    }
    scaler = checkpoint.get("MixedPrecision") or checkpoint.get("native_amp_scaling_state")
    if scaler:
        dino["fp16_scaler"] = scaler

    paths = {
        "teacher_pth": out / f"{stem}_teacher.pth",
        "teacher_safetensors": out / f"{stem}_teacher.safetensors",
        "checkpoint": out / f"{stem}_checkpoint.pth",
    }
    with atomic_path(paths["teacher_pth"]) as tmp:
        save_torch(surgenet_backbone, tmp)
    with atomic_path(paths["teacher_safetensors"]) as tmp:
        save_safetensors(teacher_backbone, tmp, metadata={"backbone": display, "naming": "timm", "epoch": str(epoch)})
    with atomic_path(paths["checkpoint"]) as tmp:
        save_torch(dino, tmp)
    paths["model_card"] = write_model_card(out, stem, display, dataset, epoch, run_config, paths, checkpoint, naming)
    log.info("exported teacher (%d tensors, %s naming) to %s", len(surgenet_backbone), naming, out)
    return paths


def write_model_card(
    out: Path,
    stem: str,
    backbone: str,
    dataset: str,
    epoch: int,
    run_config: dict,
    paths: dict,
    checkpoint: dict,
    naming: str,
) -> Path:
    """README.md beside the weights: what was trained, how, and how to load it (with checksums)."""
    hp = checkpoint.get("hyper_parameters") or {}
    global_step = int(checkpoint.get("global_step", 0))
    batch = (run_config.get("data") or {}).get("batch_size") or hp.get("batch_size")
    global_batch = int(checkpoint.get("global_batch") or batch or 0)
    progress = checkpoint.get("progress") or {}
    # Counted step by step (a resume on another world size changes the global batch); older checkpoints: the product.
    seen = int(progress.get("samples_seen") or global_step * global_batch)
    recipe = json.dumps(hp.get("dino", {}), indent=2, default=str)
    lines = [
        f"# {stem}",
        "",
        f"DINO-pretrained **{backbone}** teacher from surgenet-ssl, trained on **{dataset}** for {epoch} epoch(s) "
        f"({global_step} optimizer steps, global batch {global_batch} at the end = {seen:,} frames seen, "
        f"per-device batch {batch}).",
        "",
        "| file | content | sha256 |",
        "|---|---|---|",
        f"| `{paths['teacher_pth'].name}` | teacher backbone, {naming} naming (published SurgeNet format) | "
        f"`{sha256_file(paths['teacher_pth'])}` |",
        f"| `{paths['teacher_safetensors'].name}` | teacher backbone, timm naming | "
        f"`{sha256_file(paths['teacher_safetensors'])}` |",
        f"| `{paths['checkpoint'].name}` | full DINO checkpoint (student, teacher, optimizer, center) | "
        f"`{sha256_file(paths['checkpoint'])}` |",
        "",
        _exclusion_line(run_config),
        "",
        *_curation_lines(checkpoint),
        *_provenance_lines(checkpoint),
        "## Load",
        "```python",
        "from surgenet_ssl.models import load_backbone_weights",
        "from surgenet_ssl.backbones import build_backbone",
        f"model = build_backbone('{backbone}')",
        f"load_backbone_weights(model, '{paths['teacher_pth'].name}', backbone='{backbone}')",
        "```",
        "",
        "## Recipe",
        "```json",
        recipe,
        "```",
        "",
    ]
    card = out / f"{stem}_README.md"
    with atomic_path(card) as tmp:
        tmp.write_text("\n".join(lines))
    # README.md describes the newest export of the directory (re-exporting an older checkpoint leaves it alone).
    newer = [p for p in out.glob("*_epoch*_teacher.pth") if _epoch_of(p) > epoch]
    if not newer:
        with atomic_path(out / "README.md") as tmp:
            tmp.write_text("\n".join(lines))
    return card


def _exclusion_line(run_config: dict) -> str:
    """Model-card line: the videos kept out of pretraining by ``dataset.exclude_videos`` (the leakage guard), so a
    downstream evaluation can tell whether its test videos were seen."""
    value = (run_config.get("dataset") or {}).get("exclude_videos")
    if not value:
        return (
            "Videos excluded from pretraining (`dataset.exclude_videos`): none at training time (exclusions made at "
            "prepare time are listed in each source's manifest.json under `excluded_videos`)."
        )
    try:
        exclusion = load_video_exclusion(value)
        shown = f"{exclusion.describe()}: {', '.join(sorted(exclusion.ids))}"
    except ValueError as e:  # the list file is gone since training: show the setting as it was
        shown = f"{value} ({e})"
    return f"Videos excluded from pretraining (`dataset.exclude_videos`): {shown}."


def _curation_lines(checkpoint: dict) -> list[str]:
    """Model-card section: per source, the curated view trained on (``dataset.curated=true``): frames kept, frames
    dropped per reason, the thresholds, and the opt-out and leakage lists applied with them (video ids and frame
    keys), so a reader knows what the model never saw. Read from the checkpoint, so a re-export writes the same."""
    curation = checkpoint.get("data_curation") or {}
    if not curation:
        return ["Curation (`dataset.curated`): not used; every prepared frame of the mixture was eligible.", ""]
    lines = [
        "## Curation",
        "",
        "Trained on the curated views (`python -m surgenet_ssl.curate`, `dataset.curated=true`):",
        "",
    ]
    lines += [
        "| source | kept / frames | dropped | excluded videos (lists) | excluded frame keys (lists) |",
        "|---|---|---|---|---|",
    ]
    for name, view in sorted(curation.items()):
        dropped = ", ".join(f"{r} {n}" for r, n in (view.get("dropped") or {}).items() if n) or "none"
        ex = view.get("exclusions") or {}
        videos, frames = ex.get("videos") or {}, ex.get("frames") or {}
        video_text = (
            f"{len(videos.get('matched') or [])} matched of {len(videos.get('ids') or [])} ids from "
            f"{', '.join(videos.get('origins') or []) or 'no list'}: {', '.join(videos.get('matched') or []) or '-'}"
        )
        frame_text = (
            f"{frames.get('matched', 0)} matched of {frames.get('keys', 0)} keys from "
            f"{', '.join(frames.get('origins') or []) or 'no list'}"
        )
        lines.append(
            f"| {name} | {view.get('kept')} / {view.get('frames')} | {dropped} | {video_text} | {frame_text} |"
        )
    thresholds = {name: json.dumps(view.get("thresholds"), sort_keys=True) for name, view in curation.items()}
    if len(set(thresholds.values())) == 1:
        lines += ["", f"Thresholds (every source): `{next(iter(thresholds.values()))}`"]
    else:
        lines += [""] + [f"Thresholds of {name}: `{t}`" for name, t in sorted(thresholds.items())]
    return lines + [""]


def _provenance_lines(checkpoint: dict) -> list[str]:
    """Model-card section: the command that trained the weights, its overrides, the code's git commit and the final
    online k-NN. Read from the checkpoint, so re-exporting it writes the same card."""
    prov = checkpoint.get("run_provenance") or {}
    overrides = prov.get("overrides")
    knn = final_knn(checkpoint)
    if knn is None:
        knn_text = "not measured (callbacks.knn_monitor off, or no labelled set)"
    else:
        top5 = f", top-5 {knn['knn/top5']:.4f}" if "knn/top5" in knn else ""
        epoch = knn.get("epoch", "?")
        knn_text = f"top-1 {knn['knn/top1']:.4f}{top5} (epoch {epoch}, DINO weighted k-NN on teacher features)"
    command = prov.get("command")
    shown = ", ".join(f"`{o}`" for o in overrides) if overrides else "none" if overrides is not None else "unknown"
    return [
        "## Run",
        "",
        "Trained with (rerunning it in the same run dir resumes from the newest checkpoint):",
        "",
        "```bash",
        command or "# unknown: the checkpoint was written before commands were recorded",
        "```",
        "",
        f"- overrides: {shown}",
        f"- code: surgenet-ssl {prov.get('version', 'unknown')}, git commit {prov.get('git_commit') or 'unknown'}",
        f"- final online k-NN: {knn_text}",
        "",
    ]


def _epoch_of(path: Path) -> int:
    try:
        return int(path.name.rsplit("_epoch", 1)[1].split("_", 1)[0])
    except (IndexError, ValueError):
        return -1


def export_dino_checkpoint(
    checkpoint: dict[str, Any], output_dir: str | Path, backbone: str | None = None, dataset: str | None = None
) -> dict[str, Path]:
    """Teacher artefacts from a full DINO checkpoint (ours or the official layout: ``teacher`` = backbone.* + head.*).

    The backbone comes from ``backbone`` or from the checkpoint's ``args`` (ours record it). For the SurgeNet
    backbones the naming is detected and converted; for others (``vit_small``, any timm model) the teacher's
    ``backbone.*`` tensors are taken as they are (timm naming, as we save them).
    """
    from surgenet_ssl.models.weights import extract_backbone_state_dict

    args = checkpoint.get("args")
    args = vars(args) if hasattr(args, "__dict__") and not isinstance(args, dict) else (args or {})
    given = args.get("backbone")
    recorded = given if isinstance(given, dict) else {}
    name = backbone or recorded.get("name") or args.get("arch")
    if name == "timm":
        name = recorded.get("timm_name") or name
    if not name or name == "timm":
        raise ValueError(
            "cannot tell the backbone of this DINO checkpoint; pass backbone=NAME (caformer_s18, convnextv2_tiny, "
            "pvt_v2_b2, vit_small or a timm model name)"
        )
    dataset = dataset or (args.get("dataset") or {}).get("name") or "dino"
    if name in SURGENET_NAMED:
        teacher, detected = extract_backbone_state_dict(checkpoint, name)
        surgenet = timm_to_surgenet(teacher, name)
    else:
        raw = checkpoint.get("teacher")
        if not isinstance(raw, dict):
            raise ValueError("this DINO checkpoint has no 'teacher' state dict")
        teacher = {
            k.removeprefix("module.").removeprefix("backbone."): v.detach().cpu().contiguous().clone()
            for k, v in raw.items()
            if k.removeprefix("module.").startswith("backbone.")
        }
        if not teacher:
            raise ValueError("the DINO checkpoint's 'teacher' holds no 'backbone.*' tensors")
        surgenet, detected = teacher, "full DINO checkpoint, timm naming"
    epoch = int(checkpoint.get("epoch", 0))
    stem = f"{dataset}_{name}_epoch{epoch:04d}"
    out = Path(output_dir)
    paths = {"teacher_pth": out / f"{stem}_teacher.pth", "teacher_safetensors": out / f"{stem}_teacher.safetensors"}
    with atomic_path(paths["teacher_pth"]) as tmp:
        save_torch(surgenet, tmp)
    with atomic_path(paths["teacher_safetensors"]) as tmp:
        save_safetensors(teacher, tmp, metadata={"backbone": name, "naming": "timm", "epoch": str(epoch)})
    log.info("exported teacher of a DINO checkpoint (%s) to %s", detected, out)
    return paths

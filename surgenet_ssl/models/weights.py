"""One weight loader for every backbone file format we meet, which never fails silently.

Why: the published SurgeNet loaders drop ``head.*`` and call ``load_state_dict(strict=False)``, so a wrapped or
prefixed file loads nothing and only prints a message. Here every source goes through the same three steps:

1. ``read_state_dict``: path / ``file://`` / ``http(s)://`` URL (downloaded once into a cache, sha256-checked)
   or an in-memory dict -> a dict, read with ``torch.load(weights_only=True)`` or safetensors.
2. ``extract_backbone_state_dict``: unwrap (full DINO checkpoint -> ``teacher``, Lightning checkpoint ->
   ``state_dict`` with ``teacher.``/``student.`` prefixes, ``model``/``state_dict`` wrappers), strip
   ``module.``/``backbone.``-style prefixes, drop heads, detect SurgeNet vs timm naming and convert to timm naming.
3. ``load_backbone_weights``: compare with the model, raise naming the tensors when a backbone tensor is missing,
   unexpected or mis-shaped, load, and return/log a ``LoadReport`` with the counts.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import torch
from torch import Tensor, nn

from surgenet_ssl.backbones import BACKBONES, CONVERTIBLE_BACKBONES, detect_naming, surgenet_to_timm
from surgenet_ssl.backbones.vit import (
    from_official_dinov2,
    is_official_dinov2,
    pos_embed_prefix_tokens,
    resample_pos_embed,
)
from surgenet_ssl.runtime.io_utils import sha256_file

__all__ = [
    "LoadReport",
    "WeightSource",
    "cache_dir",
    "download_weights",
    "read_state_dict",
    "extract_backbone_state_dict",
    "load_backbone_weights",
    "load_model_weights",
]

log = logging.getLogger(__name__)

WeightSource = str | os.PathLike | Mapping[str, Any]

CACHE_ENV = "SURGENET_SSL_CACHE"
_DOWNLOAD_TIMEOUT_S = 60
# torch.hub convention: ``name-<first 8..64 hex chars of the sha256>.ext`` carries its own checksum.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
# Prefixes that only wrap the model (DDP, torch.compile, generic wrappers): stripped when *all* keys carry one.
_TRANSPARENT_PREFIXES = ("module.", "_orig_mod.", "model.", "encoder.")


# ------------------------------------------------------------------------------------------------ reading
def cache_dir() -> Path:
    """Download cache: ``$SURGENET_SSL_CACHE/weights`` (default ``~/.cache/surgenet_ssl/weights``)."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "surgenet_ssl"
    return Path(root).expanduser() / "weights"


def _fetch(url: str, dest: Path, hash_prefix: str | None = None) -> None:
    """Download ``url`` to ``dest`` with torch.hub's helper (the one network call): it streams into a temporary file
    beside ``dest``, checks the sha256 prefix while reading, moves the file into place only when it matches and
    removes the temporary file otherwise (RuntimeError "invalid hash value")."""
    torch.hub.download_url_to_file(url, str(dest), hash_prefix=hash_prefix, progress=False)


def _check_hash(path: Path, expected: str | None) -> bool:
    return expected is None or sha256_file(path).startswith(expected.lower())


def download_weights(url: str, sha256: str | None = None, directory: str | os.PathLike | None = None) -> Path:
    """Download ``url`` once into the cache and return the local path.

    The file is checked against ``sha256`` (full hex digest or a prefix of it) or, if the file name follows the
    torch.hub convention ``name-<sha256 prefix>.ext``, against that prefix. A cached file that fails the check is
    downloaded again; a fresh download that fails it raises. Query strings (``?download=true``) are ignored for
    the file name. Downloads go to a temporary file first, so an interrupted download never poisons the cache.
    """
    parsed = urlparse(url)
    name = Path(unquote(parsed.path)).name or "weights.pth"
    match = _HASH_IN_NAME.search(name)
    expected = sha256 or (match.group(1) if match else None)
    # one sub-directory per URL: different URLs with the same file name never collide
    folder = Path(directory) if directory is not None else cache_dir()
    folder = folder / hashlib.sha256(url.encode()).hexdigest()[:16]
    dest = folder / name
    if dest.is_file():
        if _check_hash(dest, expected):
            log.info("Using cached weights %s (from %s)", dest, url)
            return dest
        log.warning("Cached %s does not match sha256 %s; downloading it again.", dest, expected)
        dest.unlink()  # a failed new download must not leave the bad copy behind
    folder.mkdir(parents=True, exist_ok=True)
    log.info("Downloading %s -> %s", url, dest)
    previous_timeout = socket.getdefaulttimeout()
    try:
        # torch.hub's helper takes no timeout: bound a stalled server through the socket default while it runs
        socket.setdefaulttimeout(previous_timeout or _DOWNLOAD_TIMEOUT_S)
        _fetch(url, dest, expected.lower() if expected else None)
    except RuntimeError as err:
        if "invalid hash value" not in str(err):
            raise
        got = re.search(r"got \W*([0-9a-f]{64})", str(err))
        raise RuntimeError(
            f"sha256 mismatch for {url}: expected {expected}, got {got.group(1) if got else err}. The download is "
            "corrupt or the file changed upstream; nothing was cached."
        ) from err
    except OSError as err:  # URLError/HTTPError, timeouts, refused connections
        raise RuntimeError(
            f"Could not download weights from {url}: {err}. Download the file yourself and pass its local path."
        ) from err
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return dest


def _local_path(source: str | os.PathLike, sha256: str | None) -> Path:
    text = os.fspath(source)
    if text.startswith(("http://", "https://")):
        return download_weights(text, sha256=sha256)
    path = Path(url2pathname(urlparse(text).path)) if text.startswith("file://") else Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Weights file not found: {path} (from {text!r}).")
    if sha256 is not None and not _check_hash(path, sha256):
        raise ValueError(f"sha256 mismatch for {path}: expected {sha256}, got {sha256_file(path)}.")
    return path


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def refuses_pickled_objects(err: BaseException) -> bool:
    """Whether ``torch.load(weights_only=True)`` refused an intact file's pickled objects (a class, a function: what
    a payload needs) rather than failing on damaged bytes (truncated zip, cut-off pickle, not a checkpoint at all:
    "Unsupported operand")."""
    text = str(err)
    return "Weights only load failed" in text and "Unsupported operand" not in text


def _is_damaged_file_error(err: BaseException) -> bool:
    return not refuses_pickled_objects(err)


def _corrupt_message(path: Path, err: BaseException) -> str:
    try:
        size = f"{path.stat().st_size:,} bytes"
    except OSError:
        size = "size unknown"
    return (
        f"Cannot read {path}: file is truncated or corrupt ({size}; {_first_line(err)}). An interrupted download or "
        "copy is the usual cause: download or copy it again and compare its size / sha256 with the original."
    )


def read_state_dict(source: WeightSource, sha256: str | None = None) -> dict[str, Any]:
    """Read a checkpoint (path, ``file://`` or ``http(s)://`` URL, or an in-memory dict) into a dict on CPU.

    ``.safetensors`` files are read with safetensors; everything else with ``torch.load(weights_only=True)``
    (``argparse.Namespace``, stored as ``args`` by the official DINO code, is allowed). Nothing else is unpickled:
    a file that needs arbitrary objects is refused with instructions instead of being executed.
    """
    if isinstance(source, Mapping):
        return dict(source)
    path = _local_path(source, sha256)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # SafetensorError: bad header / sizes, i.e. a damaged file
            raise ValueError(_corrupt_message(path, err)) from err
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError / RuntimeError subclasses depending on the failure
        if _is_damaged_file_error(err):
            raise ValueError(_corrupt_message(path, err)) from err
        raise ValueError(
            f"Cannot read {path} with torch.load(weights_only=True): {_first_line(err)} "
            "If the file holds pickled Python objects besides tensors (e.g. an OmegaConf config in a Lightning "
            "checkpoint's hyper_parameters), store plain containers instead, or - only if you trust the file - load "
            "it yourself with torch.load(..., weights_only=False) and pass the resulting dict."
        ) from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint dict.")
    return dict(obj)


# --------------------------------------------------------------------------------------------- extraction
@dataclass
class _Extracted:
    state_dict: dict[str, Tensor]
    format: str
    naming: str
    skipped: int  # tensors in the source that are not backbone tensors (DINO head, student, classifier)
    mask_token: Tensor | None = None  # the iBOT mask token of an official DINOv2 backbone (not a timm tensor)


def _is_tensor_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _unwrap(obj: Mapping[str, Any], steps: list[str]) -> dict[str, Tensor]:
    """Descend through checkpoint containers until a dict of tensors is left."""
    for _ in range(5):
        if _is_tensor_dict(obj):
            return dict(obj)
        if isinstance(obj.get("teacher"), Mapping):
            steps.append("dino_checkpoint[teacher]" if "student" in obj else "wrapped[teacher]")
            obj = obj["teacher"]
        elif isinstance(obj.get("state_dict"), Mapping):
            is_lightning = "pytorch-lightning_version" in obj or "global_step" in obj
            steps.append("lightning_checkpoint[state_dict]" if is_lightning else "wrapped[state_dict]")
            obj = obj["state_dict"]
        elif isinstance(obj.get("model"), Mapping):
            steps.append("wrapped[model]")
            obj = obj["model"]
        else:
            tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
            if not tensors:
                raise ValueError(
                    f"No tensors found; top-level keys are {sorted(obj)[:10]}. Expected a state dict, a full DINO "
                    "checkpoint (with 'teacher'), a Lightning checkpoint (with 'state_dict') or a dict wrapping one "
                    "under 'model'/'state_dict'/'teacher'."
                )
            dropped = sorted(set(obj) - set(tensors))
            log.warning("Ignoring %d non-tensor entries next to the weights: %s", len(dropped), dropped[:10])
            return tensors
    raise ValueError("Checkpoint is nested more than 5 levels deep; pass the inner state dict instead.")


def _select_prefix(sd: dict[str, Tensor], prefix: str) -> tuple[dict[str, Tensor], int]:
    chosen = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return chosen, len(sd) - len(chosen)


def _strip_prefixes(sd: dict[str, Tensor], steps: list[str]) -> tuple[dict[str, Tensor], int]:
    """Remove wrapper prefixes; prefer the teacher over the student; keep only ``backbone.`` when present."""
    skipped = 0
    while sd:
        firsts = {k.split(".", 1)[0] + "." for k in sd}
        if len(firsts) == 1 and next(iter(firsts)) in _TRANSPARENT_PREFIXES:
            prefix = next(iter(firsts))
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
            steps.append(f"prefix {prefix!r}")
            continue
        for role in ("teacher.", "student.", "backbone."):
            if role in firsts:
                if role == "student.":
                    log.warning("No 'teacher.' weights in the checkpoint; using the student's.")
                sd, n = _select_prefix(sd, role)
                skipped += n
                steps.append(f"prefix {role!r}")
                break
        else:
            return sd, skipped
    return sd, skipped


def _is_classifier(key: str) -> bool:
    return key.startswith("head.") and not key.startswith("head.norm.")


def _extract(obj: Mapping[str, Any], backbone: str) -> _Extracted:
    if backbone not in BACKBONES:
        raise ValueError(f"Unknown backbone '{backbone}'. Valid choices: {', '.join(BACKBONES)}.")
    steps: list[str] = []
    sd = _unwrap(obj, steps)
    total = len(sd)
    sd, skipped = _strip_prefixes(sd, steps)
    mask_token: Tensor | None = None  # (an official DINOv2 file's: counted as skipped; initialize_dino places it)
    naming: str = "timm"
    if backbone in CONVERTIBLE_BACKBONES:
        naming = detect_naming(sd, backbone)
        timm_sd = (
            surgenet_to_timm(sd, backbone)
            if naming == "surgenet"
            else {k: v.detach().cpu().contiguous() for k, v in sd.items() if not _is_classifier(k)}
        )
    else:  # ViTs / any timm model: timm naming, or Meta's DINOv2 layout (converted to timm naming)
        if is_official_dinov2(sd):
            naming = "official DINOv2"
            sd, mask_token = from_official_dinov2(sd)
        timm_sd = {k: v.detach().cpu().contiguous() for k, v in sd.items() if not _is_classifier(k)}
    if not timm_sd:
        raise ValueError(f"No {backbone} backbone tensors left after unwrapping ({', '.join(steps) or 'flat'}).")
    fmt = ", ".join(steps or ["flat state dict"])
    return _Extracted(timm_sd, f"{fmt}; {naming} naming", naming, total - len(timm_sd), mask_token)


def extract_backbone_state_dict(obj: Mapping[str, Any], backbone: str) -> tuple[dict[str, Tensor], str]:
    """Backbone tensors of any supported checkpoint dict, in timm naming, plus a description of what was found.

    Returns ``(state_dict, detected_format)``; ``detected_format`` reads e.g.
    ``"lightning_checkpoint[state_dict], prefix 'teacher.', prefix 'backbone.'; timm naming"`` or
    ``"flat state dict; surgenet naming"``.
    """
    ex = _extract(obj, backbone)
    return ex.state_dict, ex.format


# ---------------------------------------------------------------------------------------------- loading
@dataclass
class LoadReport:
    """What ``load_backbone_weights`` did; ``str(report)`` is the log line."""

    source: str
    format: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: int = 0  # tensors of the file that are not backbone tensors (DINO head, student, classifier)
    # an official DINOv2 file's iBOT mask token: not a timm tensor; initialize_dino places it, others ignore it
    mask_token: Tensor | None = field(default=None, repr=False)
    resampled: str = ""  # e.g. "pos_embed 37x37 -> 16x16" when the position table was resampled to the model

    def __str__(self) -> str:
        resampled = f", {self.resampled}" if self.resampled else ""
        return (
            f"Loaded {self.loaded} backbone tensors from {self.source} ({self.format}): "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {self.skipped} non-backbone skipped"
            f"{resampled}."
        )


def _is_model_classifier(model: nn.Module) -> Callable[[str], bool]:
    """Predicate for the model's own classifier tensors (not expected in a backbone file): timm's
    ``pretrained_cfg['classifier']`` (e.g. ``fc`` for ResNets) and every ``head.*`` except the ``head.norm`` that
    belongs to the CaFormer/ConvNeXt backbone (MLP heads such as CaFormer's ``head.fc.fc1`` included)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") or "head"
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    prefixes = tuple(f"{n}." for n in names if not f"{n}.".startswith("head.norm."))
    return lambda key: _is_classifier(key) or key.startswith(prefixes)


def _fit_pos_embed(sd: dict[str, Tensor], model: nn.Module) -> str:
    """Resample a ViT file's square position table to the model's patch grid in place (a file at 518 px into a model
    built at 224 or 336 px); returns what was done, "" when nothing was needed or possible (shape errors follow)."""
    own = getattr(model, "pos_embed", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    pos = sd.get("pos_embed")
    if not isinstance(own, Tensor) or pos is None or grid is None or pos.shape == own.shape:
        return ""
    prefix = pos_embed_prefix_tokens(model)
    n = pos.shape[1] - prefix
    side = int(n**0.5)
    if pos.ndim != 3 or pos.shape[-1] != own.shape[-1] or side * side != n:
        return ""
    sd["pos_embed"] = resample_pos_embed(pos, (int(grid[0]), int(grid[1])), prefix)
    return f"pos_embed {side}x{side} -> {grid[0]}x{grid[1]}"


def _source_name(source: WeightSource) -> str:
    return "<state dict>" if isinstance(source, Mapping) else os.fspath(source)


def _variant_hint(keys: list[str]) -> str:
    if any(re.search(r"\.act1?\.(scale|bias)$", k) for k in keys):
        return (
            " The difference is StarReLU scale/bias: the file and the model are different CaFormer variants "
            "(SurgeNet = ReLU, ImageNet = StarReLU). Pass pretrained='ImageNet' or 'SurgeNet' to match the file."
        )
    return ""


def load_backbone_weights(
    model: nn.Module,
    source: WeightSource,
    backbone: str,
    strict_backbone: bool = True,
    sha256: str | None = None,
    source_name: str | None = None,
) -> LoadReport:
    """Load backbone weights from any supported source into a timm ``model`` built by ``build_backbone``.

    ``source``: a path, ``file://`` or ``http(s)://`` URL, or a dict (flat state dict or checkpoint). Formats:
    SurgeNet-named teacher ``.pth``, timm-named ``.safetensors``/``.pth``, full DINO checkpoints, Lightning
    checkpoints (teacher preferred) and ``state_dict``/``model``/``teacher`` wrappers with ``module.``/``backbone.``
    prefixes. The model's own classifier (e.g. ``head.fc`` for num_classes > 0) is not expected in the file.

    Raises ValueError naming the tensors when a backbone tensor is mis-shaped, or (``strict_backbone=True``)
    missing from the file, or when the file holds tensors the model lacks; also when nothing at all would load.
    ``source_name`` names an in-memory ``source`` in messages (default: the path/URL, or ``<state dict>``).
    """
    obj = read_state_dict(source, sha256=sha256)
    ex = _extract(obj, backbone)
    sd = ex.state_dict
    target = model.state_dict()
    is_classifier = _is_model_classifier(model)
    name = source_name or _source_name(source)
    resampled = _fit_pos_embed(sd, model)

    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in sd.items()
        if k in target and v.shape != target[k].shape
    ]
    if mismatched:
        raise ValueError(
            f"{len(mismatched)} tensor(s) in {name} have the wrong shape for {backbone}: {mismatched[:10]}. "
            "Is the file for another backbone or model size?"
        )
    missing = [k for k in target if k not in sd and not is_classifier(k)]
    unexpected = [k for k in sd if k not in target]
    if strict_backbone and (missing or unexpected):
        raise ValueError(
            f"{name} does not match the {backbone} model ({ex.format}): {len(missing)} backbone tensor(s) missing "
            f"from the file {missing[:10]}, {len(unexpected)} unexpected {unexpected[:10]}."
            f"{_variant_hint(missing + unexpected)} Use strict_backbone=False to load a partial match on purpose."
        )
    loadable = {k: v for k, v in sd.items() if k in target}
    if not loadable:
        raise ValueError(f"No tensor of {name} ({ex.format}) matches the {backbone} model; nothing would be loaded.")
    result = model.load_state_dict(loadable, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # filtered above
    report = LoadReport(name, ex.format, len(loadable), missing, unexpected, ex.skipped, ex.mask_token, resampled)
    (log.warning if (missing or unexpected) else log.info)("%s", report)
    return report


def load_model_weights(model: nn.Module, source: WeightSource, sha256: str | None = None) -> LoadReport:
    """Load a *whole* timm model, its classifier included (a user's frame classifier for curation), from any
    supported file: read like every weight file here (``weights_only``/safetensors), wrappers and transparent
    prefixes removed, then every tensor must match the model by name and shape (raises naming the ones that do
    not: a file for another architecture or number of classes never loads partly)."""
    obj = read_state_dict(source, sha256=sha256)
    steps: list[str] = []
    sd, _ = _strip_prefixes(_unwrap(obj, steps), steps)
    name = _source_name(source)
    target = model.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in sd.items()
        if k in target and v.shape != target[k].shape
    ]
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    if mismatched or missing or unexpected:
        raise ValueError(
            f"{name} does not match the model ({', '.join(steps) or 'flat state dict'}): {len(mismatched)} "
            f"mis-shaped {mismatched[:5]}, {len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected "
            f"{unexpected[:5]}. Is the file for another architecture or number of classes?"
        )
    model.load_state_dict(sd, strict=True)
    report = LoadReport(name, ", ".join(steps or ["flat state dict"]), len(sd))
    log.info("%s", report)
    return report

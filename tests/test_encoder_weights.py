"""model.encoder_weights naming a state dict file the user brings (timm, torchgeo or smp
names): the weights land in the encoder, whatever wraps or prefixes them, a 3-band first
convolution is adapted, and a file that does not fit is one line naming it."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from magseg.config import ModelConfig
from magseg.models.smp import create_backbone
from magseg.errors import ModelError, WeightsUnavailableError
from magseg.models.pretrained import adapt_first_conv, is_weights_file


def _encoder(encoder: str, weights, in_channels: int = 3):
    config = ModelConfig(arch="Unet", encoder=encoder, encoder_weights=weights, in_channels=in_channels)
    return create_backbone(config, 2).encoder


def _timm_state(name: str, seed: int, **kwargs) -> dict[str, torch.Tensor]:
    """A timm model's full state dict (classifier included), as timm and torchgeo save them."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs)
    for p in model.parameters():  # not the init: every tensor must be the file's
        p.data.uniform_(-1, 1)
    return model.state_dict()


def _same(encoder, state, prefix=""):
    own = encoder.state_dict()
    for key, value in state.items():
        if prefix + key in own:
            torch.testing.assert_close(own[prefix + key], value, rtol=0, atol=0, msg=key)


def test_a_timm_state_dict_loads_into_the_tu_encoder(tmp_path):
    state = _timm_state("test_resnet", seed=1)
    torch.save(state, tmp_path / "w.pth")
    encoder = _encoder("tu-test_resnet", str(tmp_path / "w.pth"))
    _same(encoder, state, prefix="model.")
    assert "fc.weight" in state  # the classifier the encoder has no place for is left out


def test_wrapped_and_prefixed_torchgeo_style_weights_load_into_an_smp_resnet(tmp_path):
    # torchgeo's ResNet-18 weights are a timm resnet18 state dict; the names are also those
    # of smp's own resnet18 encoder. Here wrapped as a Lightning checkpoint would be.
    state = _timm_state("resnet18", seed=2, in_chans=5)
    torch.save({"state_dict": {f"model.backbone.{k}": v for k, v in state.items()}, "epoch": 3},
               tmp_path / "lightning.ckpt")
    encoder = _encoder("resnet18", str(tmp_path / "lightning.ckpt"), in_channels=5)
    _same(encoder, state)
    save_file(state, str(tmp_path / "w.safetensors"))
    _same(_encoder("tu-resnet18", str(tmp_path / "w.safetensors"), in_channels=5), state, "model.")


def test_a_three_band_first_convolution_is_adapted_to_more_bands(tmp_path):
    state = _timm_state("test_resnet", seed=3)
    torch.save(state, tmp_path / "rgb.pth")
    encoder = _encoder("tu-test_resnet", str(tmp_path / "rgb.pth"), in_channels=4)
    first = "conv1.0.weight"
    got = encoder.state_dict()[f"model.{first}"]
    torch.testing.assert_close(got, adapt_first_conv(state[first], 4))
    # Band 4 repeats band 1's filters; every band is scaled by 3/4 (smp's rule).
    torch.testing.assert_close(got[:, 3], state[first][:, 0] * 0.75)


@pytest.mark.parametrize("make, says", [
    (lambda p: torch.save(_timm_state("resnet18", 4), p), "does not fit encoder 'tu-test_resnet'"),
    (lambda p: torch.save(_timm_state("test_resnet", 4, in_chans=13), p), "takes 13 bands"),
    (lambda p: p.write_bytes(b"not a state dict"), "cannot read it as a state dict"),
    (lambda p: torch.save({"epoch": 3}, p), "holds no tensors"),
    (lambda p: None, "no such file"),
])
def test_a_file_that_does_not_fit_is_one_line_naming_it(tmp_path, make, says):
    path = tmp_path / "w.pth"
    make(path)
    with pytest.raises((ModelError, WeightsUnavailableError)) as err:
        _encoder("tu-test_resnet", str(path))
    message = str(err.value)
    assert says in message and str(path) in message and "\n" not in message, message


def test_which_values_name_a_file():
    assert is_weights_file("weights/resnet18_s2.pth") and is_weights_file("w.safetensors")
    assert not is_weights_file("imagenet") and not is_weights_file(None)

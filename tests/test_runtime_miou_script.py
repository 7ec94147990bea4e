"""scripts/runtime_miou.py's calibration windows: what int8 quantisation is calibrated on."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from magseg.config import load_config
from synthetic import SceneSpec, write_dataset

from conftest import CONFIGS


def test_calibration_windows_are_training_windows_at_the_models_input(tmp_path):
    from runtime_miou import calibration_windows

    config = load_config(CONFIGS / "demo.yaml").override(["data.mean=[120,120,100]", "data.std=[40,40,40]"])
    write_dataset(tmp_path, {"train": 2, "val": 1}, SceneSpec(size=(128, 128)), seed=0)
    batches = calibration_windows(config, str(tmp_path), count=5, size=(64, 48), batch=2)
    assert [b.shape for b in batches] == [(2, 3, 64, 48), (2, 3, 64, 48), (1, 3, 64, 48)]
    assert all(b.dtype == np.float32 and np.isfinite(b).all() for b in batches)
    # Normalised pixels of real scenes: neither constant nor raw 0..255 values.
    values = np.concatenate([b.ravel() for b in batches])
    assert values.std() > 0.1 and np.abs(values).max() < 20


@pytest.mark.skipif(importlib.util.find_spec("nncf") is None or importlib.util.find_spec("openvino") is None,
                    reason="nncf and openvino not installed (the openvino-int8 variant: pip install nncf)")
@pytest.mark.parametrize("vnni", [True, False])
def test_openvino_int8_variant_quantises_the_graph_and_stays_near_fp32(tmp_path, monkeypatch, vnni):
    """NncfInt8Backbone: NNCF's quantisation of the cached OpenVINO graph (FakeQuantize nodes
    in it), 7-bit weights in every layer only without VNNI, on the calibration windows given,
    and probabilities near the fp32 graph's. Bounds, not bits: int8 kernels differ by CPU."""
    import nncf
    import runtime_miou
    from nncf.quantization.advanced_parameters import OverflowFix

    from magseg.checkpoint import save_checkpoint
    from magseg.segmenter import Segmenter, create_refiner, create_segmenter_model

    torch.manual_seed(0)
    config = load_config(CONFIGS / "tiny.yaml")
    ckpt = save_checkpoint(tmp_path / "tiny.ckpt", config, create_segmenter_model(config), create_refiner(config))
    sets = ["engine.runtime=openvino", "engine.precision=fp32", f"engine.cache_dir={tmp_path / 'cache'}"]
    fp32, int8 = Segmenter.from_checkpoint(ckpt, sets), Segmenter.from_checkpoint(ckpt, sets)
    rng = np.random.default_rng(0)
    asked = []
    int8.backbone.__class__ = runtime_miou.NncfInt8Backbone
    int8.backbone.calibrate = lambda size: (asked.append(size),
                                            [rng.standard_normal((4, 3, *size)).astype(np.float32)])[1]
    quantised, original = [], nncf.quantize

    def quantize(model, dataset, **kwargs):
        quantised.append((kwargs, original(model, dataset, **kwargs)))
        return quantised[-1][1]

    monkeypatch.setattr(nncf, "quantize", quantize)
    monkeypatch.setattr(runtime_miou, "cpu_has_vnni", lambda: vnni)
    x = torch.from_numpy(rng.standard_normal((8, 3, 32, 32)).astype(np.float32))
    with torch.inference_mode():
        want, got = fp32.backbone(x), int8.backbone(x)
    assert asked == [(32, 32)] and len(quantised) == 1
    kwargs, model = quantised[0]
    assert kwargs["subset_size"] == 4  # one window an item
    fix = kwargs["advanced_parameters"].overflow_fix
    assert fix == (OverflowFix.FIRST_LAYER if vnni else OverflowFix.ENABLE)
    assert sum(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops()) > 0
    assert int8.backbone.returns_probabilities  # OpenVINO's graph ends in the softmax
    assert (got - want).abs().mean().item() < 0.02
    assert (got.argmax(1) == want.argmax(1)).float().mean().item() >= 0.8

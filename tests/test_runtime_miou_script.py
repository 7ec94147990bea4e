"""scripts/runtime_miou.py's calibration windows: what int8 quantisation is calibrated on."""

from __future__ import annotations

import numpy as np

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


def test_the_onnxruntime_int8_variant_runs_the_quantised_graph(tmp_path, make_checkpoint, monkeypatch, capsys):
    # The variant quantises each cached fp32 graph with ONNX Runtime and runs the int8 one in
    # a session of its own: its labels come from another graph than fp32's, on every scene.
    import json
    import sys

    import pytest
    from synthetic import DEEPGLOBE_CLASSES_OVERRIDE

    from magseg.engine import runtime as rt

    if not rt.installed("onnxruntime"):
        pytest.skip("onnxruntime, onnx and onnxscript not installed (magseg[onnx])")
    import runtime_miou

    write_dataset(tmp_path / "data", {"train": 2, "val": 1, "test": 2}, SceneSpec(size=(128, 128)), seed=0)
    ckpt = make_checkpoint(DEEPGLOBE_CLASSES_OVERRIDE)
    loaded = []

    def quantize(fp32, int8, batches, real=rt.quantize_int8):
        loaded.append(int8)
        return real(fp32, int8, batches)

    monkeypatch.setattr(runtime_miou.rt, "quantize_int8", quantize)
    monkeypatch.setattr(sys, "argv", ["runtime_miou.py", str(ckpt), str(tmp_path / "data"), "--calibration", "4",
                                      "--variants", "torch-fp32,onnxruntime-int8"])
    runtime_miou.main()
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["scenes"] == 2 and set(out["miou"]) == {"torch-fp32", "onnxruntime-int8"}
    assert out["label_agreement_with_first"]["torch-fp32"] == 1.0
    assert 0 <= out["label_agreement_with_first"]["onnxruntime-int8"] <= 1
    assert loaded and all(path.is_file() and path.name.endswith(".int8.onnx") for path in loaded)

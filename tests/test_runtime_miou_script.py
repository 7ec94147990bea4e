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

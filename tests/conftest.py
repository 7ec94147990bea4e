"""Shared fixtures: the tiny config, tiny models, and checkpoints made on the fly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from magseg.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # Determinism for tests that compare two runs. One thread: tiny convolutions gain nothing
    # from a second, and when anything else shares the 2 cores OpenMP's waiting threads make
    # them up to 50x slower (measured: 0.07 s vs 4 s for one predict window).
    torch.manual_seed(0)
    torch.set_num_threads(1)


@pytest.fixture
def tiny_config() -> Config:
    """configs/tiny.yaml: 3 stages 32 -> 64 -> 128, crop 32, 4 classes, tu-test_resnet Unet."""
    return load_config(CONFIGS / "tiny.yaml")


@pytest.fixture
def tiny_segmenter(tiny_config):
    from magseg.segmenter import Segmenter

    return Segmenter.from_config(tiny_config)


@pytest.fixture
def make_checkpoint(tmp_path, tiny_config):
    """Factory: write a checkpoint of fresh tiny models (optionally with config overrides)."""
    from magseg.checkpoint import save_checkpoint
    from magseg.segmenter import create_refiner, create_segmenter_model

    def make(overrides=(), name="tiny.ckpt", with_refiner=True) -> Path:
        config = tiny_config.override(overrides) if overrides else tiny_config
        backbone = create_segmenter_model(config)
        refiner = create_refiner(config) if with_refiner else None
        return save_checkpoint(tmp_path / name, config, backbone, refiner)

    return make


@pytest.fixture(scope="session")
def fitted_checkpoint(tmp_path_factory):
    """A checkpoint whose backbone was fitted to ``colour_rule`` (64 px scenes, refiner): its
    predictions depend on the image (tests/fitted_model.py)."""
    from fitted_model import fit_backbone

    from magseg.checkpoint import save_checkpoint
    from magseg.segmenter import create_refiner

    config = load_config(CONFIGS / "tiny.yaml", ["pyramid.scales=[16,32,64]", "pyramid.crop=16",
                                                "pyramid.input=32"])
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        backbone = fit_backbone(config)
        refiner = create_refiner(config)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "fitted.ckpt", config, backbone, refiner)


@pytest.fixture(params=["eager", "fused"])
def refine_path(request, monkeypatch):
    """Both CPU paths of the refine step: ATen's passes, and the compiled fused pass
    (magseg.engine.fused) that the engine takes on stages of a megapixel or more in large
    crops. With
    ``fused`` every stage takes it, and the test fails if no stage did."""
    if request.param == "eager":
        yield "eager"
        return
    from magseg.engine import fused, refiner_network

    if not fused.available():
        pytest.skip("numba is not installed: the engine runs the eager refine step")
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return fused.refine_pass(*args, **kwargs)

    monkeypatch.setattr(fused, "FUSED_MIN_PIXELS", 0)
    monkeypatch.setattr(fused, "FUSED_MIN_CROP", 0)
    monkeypatch.setattr(refiner_network, "refine_pass", counted)
    yield "fused"
    assert calls, "no stage took the fused pass"

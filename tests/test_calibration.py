"""Calibration (magseg.evaluation.calibration): ECE on hand-made bins, the temperature that
undoes a known over-confidence, the temperature stored in checkpoints and applied to probs
and uncertainty, never to labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fitted_model import colour_rule
from geotiff import smooth_image

from magseg.checkpoint import load_checkpoint, save_checkpoint
from magseg.errors import CheckpointError
from magseg.evaluation.calibration import ReliabilityBins, apply_temperature, fit_temperature
from magseg.segmenter import Segmenter, create_refiner, create_segmenter_model
from magseg.training.calibrate import fit_calibration
from magseg.io.raster import VALUE_MAX


def test_ece_by_hand():
    # Two classes, 4 pixels: confidences 0.95, 0.95 (bin 14), 0.6 (bin 9), 0.55 (bin 8);
    # right, wrong, right, wrong.
    p0 = torch.tensor([0.95, 0.05, 0.6, 0.55])
    probs = torch.stack([p0, 1 - p0])[:, None, :]  # (C, 1, 4)
    target = torch.tensor([[0, 0, 0, 1]])
    bins = ReliabilityBins()
    bins.update(probs, target)
    assert bins.count[14] == 2 and bins.count[9] == 1 and bins.count[8] == 1
    # |0.5 - 0.95| * 2 + |1 - 0.6| + |0 - 0.55|, over 4 pixels.
    assert bins.ece() == pytest.approx((0.45 * 2 + 0.4 + 0.55) / 4)
    rows = bins.to_dict()["bins"]
    assert rows[14]["accuracy"] == 0.5 and rows[14]["confidence"] == pytest.approx(0.95)
    assert rows[0]["pixels"] == 0 and rows[0]["accuracy"] is None
    # Bins add up: two halves give the same bins as the whole.
    a, b = ReliabilityBins(), ReliabilityBins()
    a.update(probs[..., :2], target[..., :2])
    b.update(probs[..., 2:], target[..., 2:])
    a += b
    assert torch.equal(a.count, bins.count) and a.ece() == pytest.approx(bins.ece())
    assert ReliabilityBins().ece() is None


def test_temperature_is_a_softmax_of_scaled_logits_and_keeps_the_order():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(5, 6, 7, generator=gen) * 3
    p = z.softmax(0)
    for t in (0.5, 1.0, 2.5):
        torch.testing.assert_close(apply_temperature(p, t), (z / t).softmax(0), atol=1e-6, rtol=1e-5)
        assert torch.equal(apply_temperature(p, t).argmax(0), p.argmax(0))
    # A nodata pixel (all zeros) stays all zeros.
    p[:, 0, 0] = 0
    assert torch.equal(apply_temperature(p, 2.0)[:, 0, 0], torch.zeros(5))


def test_fit_recovers_a_known_over_confidence():
    # Labels drawn from softmax(z / 2) while the model says softmax(z): the model is
    # over-confident by a temperature of 2, which the fit finds, and the ECE falls.
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(40000, 4, generator=gen) * 4
    target = torch.multinomial((z / 2).softmax(1), 1, generator=gen)[:, 0]
    probs = z.softmax(1)
    t = fit_temperature(probs, target)
    assert t == pytest.approx(2.0, rel=0.05)
    cal = fit_calibration(probs, target)
    assert cal["temperature"] == pytest.approx(t)
    assert cal["val_ece_after"] < cal["val_ece_before"] / 3
    assert fit_temperature(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)) == 1.0


def test_a_temperature_that_raises_the_ece_is_not_kept(monkeypatch):
    # Calibrated probabilities (labels drawn from them); a fit that went to T = 4 would
    # flatten them and raise the ECE: T = 1 is stored, the fitted value beside it.
    import magseg.training.calibrate as calibrate

    gen = torch.Generator().manual_seed(2)
    probs = (torch.randn(20000, 4, generator=gen) * 3).softmax(1)
    target = torch.multinomial(probs, 1, generator=gen)[:, 0]
    monkeypatch.setattr(calibrate, "fit_temperature", lambda p, t: 4.0)
    cal = calibrate.fit_calibration(probs, target)
    assert cal["fitted_temperature"] == 4.0 and cal["kept"] is False and cal["temperature"] == 1.0
    assert cal["val_ece_fitted"] > cal["val_ece_before"] == cal["val_ece_after"]


def _fitted_segmenter(fitted_checkpoint):
    return Segmenter.from_checkpoint(fitted_checkpoint, ["engine.precision=fp32"])


def test_fitted_temperature_lowers_the_ece_of_a_fitted_model(fitted_checkpoint):
    # The tests' fitted model on smooth images labelled by its colour rule: the temperature
    # fitted on "validation" images lowers their ECE (or keeps it).
    segmenter = _fitted_segmenter(fitted_checkpoint)
    probs, targets = [], []
    for seed in range(3):
        image = smooth_image(3, 64, 64, seed=100 + seed)
        result = segmenter.segment(segmenter.normalize(image), return_probs=True)
        probs.append(result.probs.flatten(1).T)
        targets.append(torch.from_numpy(colour_rule(image)).flatten())
    cal = fit_calibration(torch.cat(probs), torch.cat(targets))
    assert cal["val_ece_after"] <= cal["val_ece_before"]
    assert cal["temperature"] != 1.0


def test_checkpoint_stores_the_temperature_and_old_ones_mean_1(tmp_path, tiny_config):
    backbone, refiner = create_segmenter_model(tiny_config), create_refiner(tiny_config)
    old = save_checkpoint(tmp_path / "old.ckpt", tiny_config, backbone, refiner)
    assert load_checkpoint(old).calibration is None and load_checkpoint(old).temperature == 1.0
    new = save_checkpoint(tmp_path / "new.ckpt", tiny_config, backbone, refiner,
                          calibration={"temperature": 1.7, "val_ece_before": 0.1})
    assert load_checkpoint(new).temperature == 1.7
    assert Segmenter.from_checkpoint(new).temperature == 1.7
    bad = save_checkpoint(tmp_path / "bad.ckpt", tiny_config, backbone, refiner,
                          calibration={"temperature": -1.0})
    with pytest.raises(CheckpointError, match="temperature"):
        load_checkpoint(bad)


def test_temperature_changes_probs_never_labels(tmp_path, fitted_checkpoint):
    ckpt = load_checkpoint(fitted_checkpoint)
    segmenter = _fitted_segmenter(fitted_checkpoint)
    tempered = Segmenter.from_checkpoint(ckpt, ["engine.precision=fp32"])
    tempered.temperature = 2.0
    x = segmenter.normalize(smooth_image(3, 64, 80, seed=5))
    a = segmenter.segment(x, return_probs=True)
    b = tempered.segment(x, return_probs=True)
    raw = tempered.segment(x, return_probs=True, calibrated=False)
    assert torch.equal(a.labels, b.labels)
    torch.testing.assert_close(raw.probs, a.probs)
    torch.testing.assert_close(b.probs, apply_temperature(a.probs, 2.0))
    assert float((b.probs - a.probs).abs().max()) > 0.01


def test_predict_writes_tempered_probs_and_the_same_labels(tmp_path, fitted_checkpoint):
    import magseg.cli.predict  # noqa: F401  (registers the command)
    import rasterio
    from geotiff import write_raster
    from magseg.cli.app import app
    from typer.testing import CliRunner

    ckpt = load_checkpoint(fitted_checkpoint)
    backbone = create_segmenter_model(ckpt.config, pretrained=False)
    backbone.load_state_dict(ckpt.backbone)
    refiner = create_refiner(ckpt.config)
    refiner.load_state_dict(ckpt.refiner)
    hot = save_checkpoint(tmp_path / "hot.ckpt", ckpt.config, backbone, refiner, calibration={"temperature": 3.0})
    scene = write_raster(tmp_path / "scene.tif", smooth_image(3, 48, 70, seed=9))
    out = {}
    for name, path in (("plain", fitted_checkpoint), ("hot", hot)):
        result = CliRunner().invoke(app, ["predict", str(path), str(scene), "-o", str(tmp_path / name),
                                          "--probs", "--uncertainty", "--set", "engine.precision=fp32"])
        assert result.exit_code == 0, result.output
        with rasterio.open(tmp_path / name / "scene.tif") as src:
            labels = src.read()
        with rasterio.open(tmp_path / name / "scene_probs.tif") as src:
            probs = src.read().astype(np.float64) / VALUE_MAX
        with rasterio.open(tmp_path / name / "scene_uncertainty.tif") as src:
            uncert = src.read(1).astype(np.float64) / VALUE_MAX
        out[name] = labels, probs, uncert
    assert out["plain"][0].tobytes() == out["hot"][0].tobytes()  # labels byte-identical
    # The in-memory engine's probabilities, tempered (written as uint8: within one level).
    segmenter = Segmenter.from_checkpoint(hot, ["engine.precision=fp32"])
    with rasterio.open(scene) as src:
        x = segmenter.normalize(src.read())
    expected = segmenter.segment(x, return_probs=True).probs.numpy()
    assert np.abs(expected - out["hot"][1]).max() <= 1 / VALUE_MAX + 1e-6
    assert np.abs(expected - out["plain"][1]).max() > 0.05
    assert out["hot"][2].mean() > out["plain"][2].mean() + 0.05  # a hotter softmax: less certain
    assert math.isfinite(out["hot"][2].mean())

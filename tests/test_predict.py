"""predict_raster: windowed prediction of GeoTIFFs, checked against in-memory references.

Scenes are made small (scales 16/32/64: a 64 px scene) so that rasters of 150-300 px already
need many windows.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from conftest import CONFIGS
from fitted_model import colour_rule
from geotiff import TRANSFORM, UTM33, read_raster, smooth_image, write_raster
from torch import nn

from magseg.config import load_config
from magseg.errors import RasterError
from magseg.io.predict import PredictOptions, default_margin, output_paths, predict_raster
from magseg.io.raster import NODATA, plan_scene_windows
from magseg.segmenter import Segmenter

SMALL_SCENE = ["pyramid.scales=[16,32,64]", "pyramid.crop=16", "pyramid.input=32"]


@pytest.fixture
def fitted(fitted_checkpoint):
    return Segmenter.from_checkpoint(fitted_checkpoint)


def _pixel_model(points=1.0):
    """A Segmenter whose backbone is a fixed 1x1 convolution, every pixel refined at the
    native-resolution stage: the labels are a per-pixel function of the input."""
    config = load_config(CONFIGS / "tiny.yaml", [
        "pyramid.scales=[16,32,64]", "pyramid.crop=16", "pyramid.input=16",
        f"refine.points={points}", "refiner.enabled=false",
        "engine.precision=fp32",  # the reference below is computed in fp32
    ])
    conv = nn.Conv2d(3, 4, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [-1, -1, -1]])[..., None, None])
        conv.bias.copy_(torch.tensor([0.0, 0.1, -0.1, -0.5]))
    return Segmenter(config, conv.eval()), conv


def test_pixel_local_model_labels_every_pixel_exactly(tmp_path):
    # Any misplaced window, core offset or transposed array would change these labels.
    segmenter, conv = _pixel_model()
    image = smooth_image(3, 150, 170, seed=1)
    image[:, 20:30, :] = 0                            # all-zero padding -> nodata
    path = write_raster(tmp_path / "scene.tif", image)
    result = predict_raster(segmenter, path, tmp_path / "out", PredictOptions(probs=True))
    assert result.status == "ok" and result.windows == len(plan_scene_windows((150, 170), (64, 64), (8, 8))) > 4

    with torch.no_grad():
        logits = conv(segmenter.normalize(image)[None])[0]
    expected = logits.argmax(0).numpy().astype(np.uint8)
    expected[20:30] = NODATA
    labels, profile = read_raster(tmp_path / "out" / "scene.tif")
    np.testing.assert_array_equal(labels[0], expected)

    probs, pprofile = read_raster(tmp_path / "out" / "scene_probs.tif")
    want = (logits.softmax(0) * 255).round().numpy()
    valid = pprofile["masks"][0] > 0
    assert not valid[20:30].any() and valid[30:].all()
    assert np.abs(probs.astype(float) - want)[:, valid].max() <= 1
    counts = np.bincount(expected.ravel(), minlength=256)
    assert result.histogram == {"unknown": counts[0], "field": counts[1], "road": counts[2],
                                "water": counts[3], "nodata": 10 * 170}


def test_windowed_raster_matches_the_whole_image_except_on_class_boundaries(tmp_path, fitted):
    # The same image segmented whole (it fits in memory) and as 64 px windows. MagNet's coarse
    # stage sees a window-relative view, so the two cannot be identical; measured here: they
    # differ on ~2 % of pixels, all on class boundaries shifted by a pixel or two.
    height, width = 160, 192
    image = smooth_image(3, height, width, cell=16, seed=5)
    path = write_raster(tmp_path / "scene.tif", image)
    result = predict_raster(fitted, path, tmp_path / "out")
    assert result.windows > 9
    windowed = read_raster(tmp_path / "out" / "scene.tif")[0][0]
    whole = fitted.segment(fitted.normalize(image)).labels.numpy()

    differ = windowed != whole
    assert differ.mean() <= 0.03, f"{differ.mean():.2%} of pixels differ"
    edges = np.zeros_like(differ)
    edges[:, 1:] |= whole[:, 1:] != whole[:, :-1]
    edges[:, :-1] |= whole[:, 1:] != whole[:, :-1]
    edges[1:] |= whole[1:] != whole[:-1]
    edges[:-1] |= whole[1:] != whole[:-1]
    to_edge = cv2.distanceTransform((~edges).astype(np.uint8), cv2.DIST_L2, 3)
    interior = to_edge > 3
    assert interior.mean() > 0.3          # the check below covers a good part of the image
    assert differ[interior].mean() <= 0.001, f"{differ[interior].mean():.2%} differ off boundaries"
    assert (to_edge[differ] <= 2).mean() >= 0.98
    # and the fitted model does segment by content
    assert (windowed == colour_rule(image)).mean() > 0.85


def test_neighbouring_windows_agree_at_their_shared_border(fitted):
    # No seams: where the output switches from one window's core to the next, both windows
    # see the pixels with context and predict (nearly) the same labels.
    image = smooth_image(3, 128, 256, seed=7)
    x = fitted.normalize(image)
    plan = plan_scene_windows((128, 256), fitted.config.pyramid.scene, default_margin(fitted.config.pyramid))
    labels = {w: fitted.segment(x[(slice(None), *w.read.slices)]).labels.numpy() for w in plan}
    agree = []
    for a in plan:
        for b in plan:
            if b.core.row == a.core.row and b.core.col == a.core.col + a.core.width:
                border = b.core.col
                cols = slice(border - 4, border + 4)   # +-4 px around the seam
                rows = a.core.slices[0]
                la = labels[a][rows.start - a.read.row : rows.stop - a.read.row,
                               cols.start - a.read.col : cols.stop - a.read.col]
                lb = labels[b][rows.start - b.read.row : rows.stop - b.read.row,
                               cols.start - b.read.col : cols.stop - b.read.col]
                agree.append((la == lb).mean())
    assert len(agree) >= 4
    assert np.mean(agree) >= 0.97, agree


def test_raster_smaller_than_a_scene_is_one_window(tmp_path, fitted):
    image = smooth_image(3, 40, 50, seed=2)
    path = write_raster(tmp_path / "small.tif", image)
    result = predict_raster(fitted, path, tmp_path / "out")
    assert result.windows == 1 and (result.height, result.width) == (40, 50)
    labels = read_raster(tmp_path / "out" / "small.tif")[0][0]
    np.testing.assert_array_equal(labels, fitted.segment(fitted.normalize(image)).labels.numpy())


@pytest.mark.parametrize("dtype, factor", [(np.uint16, 257.0), (np.float32, 1 / 255)])
def test_uint16_and_float_inputs_use_the_stored_normalisation(tmp_path, fitted_checkpoint, dtype, factor):
    # The same picture stored as uint16 (x 257) or float (/ 255), with the checkpoint's
    # statistics in those units, gives the labels of the uint8 original.
    image = smooth_image(3, 100, 90, seed=3)
    stats = fitted_checkpoint
    base = Segmenter.from_checkpoint(stats)
    mean = [m * factor for m in base.config.data.mean]
    std = [s * factor for s in base.config.data.std]
    scaled = Segmenter.from_checkpoint(stats, {"data.mean": mean, "data.std": std})
    predict_raster(base, write_raster(tmp_path / "u8.tif", image), tmp_path / "out")
    predict_raster(scaled, write_raster(tmp_path / "other.tif", (image * factor).astype(dtype)), tmp_path / "out")
    a = read_raster(tmp_path / "out" / "u8.tif")[0]
    b = read_raster(tmp_path / "out" / "other.tif")[0]
    assert (a == b).mean() >= 0.999


def test_declared_nodata_and_nan_become_255(tmp_path, fitted):
    image = smooth_image(3, 80, 90, seed=4).astype(np.float32)
    image[:, :, :7] = -9999
    image[1, 50, 50] = np.nan
    path = write_raster(tmp_path / "f.tif", image, nodata=-9999)
    predict_raster(fitted, path, tmp_path / "out", PredictOptions(uncertainty=True))
    labels = read_raster(tmp_path / "out" / "f.tif")[0][0]
    assert (labels[:, :7] == NODATA).all() and labels[50, 50] == NODATA
    assert (labels[:, 7:] != NODATA).sum() == 80 * 83 - 1
    _, profile = read_raster(tmp_path / "out" / "f_uncertainty.tif")
    assert (profile["masks"][0] == 0).sum() == 80 * 7 + 1


def test_an_all_nodata_raster_needs_no_engine_run(tmp_path, fitted, monkeypatch):
    path = write_raster(tmp_path / "empty.tif", np.zeros((3, 130, 140), np.uint8))
    monkeypatch.setattr(fitted, "segment", lambda *a, **k: pytest.fail("engine ran on padding"))
    result = predict_raster(fitted, path, tmp_path / "out", PredictOptions(probs=True))
    assert result.histogram["nodata"] == 130 * 140
    assert (read_raster(tmp_path / "out" / "empty.tif")[0] == NODATA).all()


def test_probabilities_and_uncertainty_agree_with_the_labels(tmp_path, fitted):
    image = smooth_image(3, 100, 120, seed=6)
    path = write_raster(tmp_path / "s.tif", image)
    predict_raster(fitted, path, tmp_path / "out", PredictOptions(probs=True, uncertainty=True))
    labels, lp = read_raster(tmp_path / "out" / "s.tif")
    probs, pp = read_raster(tmp_path / "out" / "s_probs.tif")
    uncert, up = read_raster(tmp_path / "out" / "s_uncertainty.tif")
    for profile in (pp, up):
        assert profile["crs"] == UTM33 and profile["transform"] == TRANSFORM
        assert (profile["height"], profile["width"]) == (100, 120) and profile["dtype"] == "uint8"
    assert probs.shape == (4, 100, 120) and pp["descriptions"] == ("unknown", "field", "road", "water")
    p = probs.astype(float) / 255
    assert np.abs(p.sum(0) - 1).max() <= 4 / 255                  # rounding of 4 values
    top2 = np.sort(p, axis=0)[-2:]
    assert np.abs((1 - (top2[1] - top2[0])) - uncert[0] / 255).max() <= 3 / 255
    sure = (top2[1] - top2[0]) > 3 / 255                           # no tie after rounding
    assert (p.argmax(0) == labels[0])[sure].all()


def test_band_count_mismatch_suggests_bands(tmp_path, fitted):
    path = write_raster(tmp_path / "grey.tif", smooth_image(1, 30, 30))
    with pytest.raises(RasterError, match=r"grey.tif.*1 band.*--bands 1,1,1"):
        predict_raster(fitted, path, tmp_path / "out")
    # and the suggestion works
    result = predict_raster(fitted, path, tmp_path / "out", PredictOptions(bands=(1, 1, 1)))
    assert result.status == "ok"


def test_bands_reorder_the_input(tmp_path, fitted):
    image = smooth_image(4, 60, 60, seed=8)
    # MINISBLACK: GDAL would otherwise take a 4th uint8 band for alpha (and mask by it)
    bgrn = write_raster(tmp_path / "bgrn.tif", image[[2, 1, 0, 3]], photometric="MINISBLACK")
    predict_raster(fitted, bgrn, tmp_path / "out",
                   PredictOptions(bands=(3, 2, 1)))
    predict_raster(fitted, write_raster(tmp_path / "rgb.tif", image[:3]), tmp_path / "out")
    a = read_raster(tmp_path / "out" / "bgrn.tif")[0]
    b = read_raster(tmp_path / "out" / "rgb.tif")[0]
    np.testing.assert_array_equal(a, b)


def test_existing_outputs_are_kept_and_only_missing_ones_made(tmp_path, fitted):
    path = write_raster(tmp_path / "s.tif", smooth_image(3, 50, 50))
    out = tmp_path / "out"
    first = predict_raster(fitted, path, out)
    assert first.status == "ok"
    stamp = (out / "s.tif").stat().st_mtime_ns
    again = predict_raster(fitted, path, out)
    assert again.status == "skipped" and (out / "s.tif").stat().st_mtime_ns == stamp
    # a run asking for more makes only what is missing
    more = predict_raster(fitted, path, out, PredictOptions(uncertainty=True))
    assert more.status == "ok" and (out / "s_uncertainty.tif").exists()
    assert (out / "s.tif").stat().st_mtime_ns == stamp
    replaced = predict_raster(fitted, path, out, PredictOptions(overwrite=True))
    assert replaced.status == "ok" and (out / "s.tif").stat().st_mtime_ns != stamp


def test_output_never_replaces_its_input(tmp_path, fitted):
    path = write_raster(tmp_path / "s.tif", smooth_image(3, 20, 20))
    before = path.read_bytes()
    with pytest.raises(RasterError, match="replace the input"):
        predict_raster(fitted, path, tmp_path, PredictOptions(overwrite=True))
    assert path.read_bytes() == before


def test_output_names():
    paths = output_paths("/data/a.b.tif", "/out", PredictOptions(probs=True, uncertainty=True, preview=True))
    assert {k: str(v) for k, v in paths.items()} == {
        "labels": "/out/a.b.tif", "probs": "/out/a.b_probs.tif",
        "uncertainty": "/out/a.b_uncertainty.tif", "preview": "/out/a.b_preview.png",
        "categories": "/out/a.b.tif.aux.xml",
    }

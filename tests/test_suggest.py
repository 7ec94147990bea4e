"""``magseg suggest``: the windows of a batch where the model is least sure, ranked, in a
GeoPackage; predict's uncertainty reused when it is this model's, computed otherwise."""

from __future__ import annotations

import json

import numpy as np
import pyogrio
import pytest
import rasterio
from geotiff import TRANSFORM, UTM33, write_raster
from magseg.cli.app import _register, app
from typer.testing import CliRunner

from magseg.segmenter import Segmenter
from magseg.io.raster import VALUE_MAX

_register()


def _suggest(*args):
    result = CliRunner().invoke(app, ["suggest", *map(str, args)])
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result, lines


def _scene(height=96, width=128, hard_cols=slice(64, 128), seed=0):
    """Clear red everywhere (class 'field' by the fitted model's colour rule); in
    ``hard_cols`` red and green equally bright, which the rule cannot tell apart."""
    rng = np.random.default_rng(seed)
    image = np.zeros((3, height, width), np.float64)
    image[0], image[1], image[2] = 230, 40, 40
    image[0, :, hard_cols] = 200
    image[1, :, hard_cols] = 200
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 1, 255).astype(np.uint8)


def _read(path):
    """The GeoPackage's layer as ``{column: list}``, geometries as shapely under ``geometry``."""
    import shapely

    meta, _, geometries, values = pyogrio.raw.read(path, layer="to_label")
    frame = {name: list(column) for name, column in zip(meta["fields"], values)}
    frame["geometry"] = list(shapely.from_wkb(geometries))
    return frame


def _fake_prediction(where, segmenter, uncertainty, labels, stem="scene"):
    """What `magseg predict --uncertainty` writes, with this model's provenance tags."""
    tags = segmenter.provenance.tags()
    for name, array, extra in ((f"{stem}.tif", labels, {}),
                               (f"{stem}_uncertainty.tif", uncertainty, {})):
        path = write_raster(where / name, array[None].astype(np.uint8), **extra)
        with rasterio.open(path, "r+") as dst:
            dst.update_tags(**tags)


def test_reuses_predicts_uncertainty_and_ranks_the_hard_windows(tmp_path, fitted_checkpoint):
    segmenter = Segmenter.from_checkpoint(fitted_checkpoint)
    raster = write_raster(tmp_path / "scene.tif", _scene())
    preds = tmp_path / "pred"
    preds.mkdir()
    uncertainty = np.full((96, 128), 10, np.uint8)
    uncertainty[32:64, 64:96] = 200  # the hardest window of the 32 px grid
    uncertainty[0:32, 96:128] = 120  # the second
    uncertainty[64:96, 0:32] = 60  # the third
    labels = np.ones((96, 128), np.uint8)
    labels[32:48, 64:96] = 2  # half of the hardest window is class 2
    _fake_prediction(preds, segmenter, uncertainty, labels)
    out = tmp_path / "to_label.gpkg"
    result, lines = _suggest(fitted_checkpoint, raster, "-o", out, "--n", "3", "--size", "32",
                             "--predictions", preds)
    assert result.exit_code == 0, result.output
    assert lines[0]["uncertainty"] == "reused" and lines[-1]["windows"] == 3
    info = pyogrio.read_info(out, layer="to_label")
    assert info["crs"].endswith("32633") or "UTM zone 33N" in info["crs"]
    meta = pyogrio.read_info(out, layer="to_label")["layer_metadata"]
    assert meta["MAGSEG_CHECKPOINT_SHA256"] == segmenter.provenance.checkpoint_sha256
    frame = _read(out)
    assert frame["rank"] == [1, 2, 3]
    assert [(r, c) for r, c in zip(frame["row"], frame["col"])] == [(32, 64), (0, 96), (64, 0)]
    assert frame["mean_uncertainty"] == pytest.approx([200 / VALUE_MAX, 120 / VALUE_MAX, 60 / VALUE_MAX], abs=1e-6)
    assert frame["share_field"][0] == pytest.approx(0.5) and frame["share_road"][0] == pytest.approx(0.5)
    assert frame["share_field"][1] == 1.0 and frame["dominant_class"][1] == "field"
    # The window's footprint in the raster's CRS: 32 px of 10 m from the raster's origin.
    x0, y0 = TRANSFORM @ (64, 32)
    assert frame["geometry"][0].bounds == pytest.approx((x0, y0 - 320, x0 + 320, y0))


def test_computes_the_uncertainty_when_none_is_this_models(tmp_path, fitted_checkpoint):
    # Two rasters: one clear all over, one with a hard right half. Another model's
    # uncertainty sits in --predictions and is not used.
    segmenter = Segmenter.from_checkpoint(fitted_checkpoint)
    clear = write_raster(tmp_path / "clear.tif", _scene(hard_cols=slice(0, 0), seed=1))
    hard = write_raster(tmp_path / "hard.tif", _scene(seed=2))
    preds = tmp_path / "pred"
    preds.mkdir()
    _fake_prediction(preds, segmenter, np.full((96, 128), 255, np.uint8), np.ones((96, 128), np.uint8),
                     stem="clear")
    with rasterio.open(preds / "clear_uncertainty.tif", "r+") as dst:
        dst.update_tags(MAGSEG_CHECKPOINT_SHA256="another")
    out = tmp_path / "to_label.gpkg"
    result, lines = _suggest(fitted_checkpoint, clear, hard, "-o", out, "--n", "4", "--size", "32",
                             "--predictions", preds)
    assert result.exit_code == 0, result.output
    assert [line["uncertainty"] for line in lines[:2]] == ["computed", "computed"]
    frame = _read(out)
    # The four most uncertain windows are in the hard half of the hard raster.
    assert set(frame["raster"]) == {str(hard)}
    assert all(c >= 64 for c in frame["col"])
    assert list(frame["mean_uncertainty"]) == sorted(frame["mean_uncertainty"], reverse=True)
    # Nothing of the scratch predictions is left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clear.tif", "hard.tif", "pred", "to_label.gpkg"]


def test_ground_size_in_metres(tmp_path, fitted_checkpoint):
    raster = write_raster(tmp_path / "scene.tif", _scene())
    out = tmp_path / "to_label.gpkg"
    result, lines = _suggest(fitted_checkpoint, raster, "-o", out, "--n", "2", "--ground-size", "480")
    assert result.exit_code == 0, result.output
    assert lines[0]["window_px"] == 48  # 480 m of 10 m pixels
    frame = _read(out)
    assert set(frame["height"]) == {48} and all(c % 48 == 0 for c in frame["col"])


def test_bad_input(tmp_path, fitted_checkpoint):
    raster = write_raster(tmp_path / "scene.tif", _scene())
    plain = write_raster(tmp_path / "plain.tif", _scene(), crs=None, transform=None)
    result, _ = _suggest(fitted_checkpoint, raster, "-o", tmp_path / "a.gpkg", "--size", "8", "--ground-size", "9")
    assert result.exit_code == 2 and "--size or --ground-size" in result.output
    # -o DIR: DIR/to_label.gpkg.
    result, lines = _suggest(fitted_checkpoint, raster, "-o", tmp_path / "dir", "--n", "1", "--size", "48")
    assert result.exit_code == 0 and lines[-1]["output"] == str(tmp_path / "dir" / "to_label.gpkg")
    # One raster without a projected CRS fails; the other is still ranked and written.
    result, lines = _suggest(fitted_checkpoint, plain, raster, "-o", tmp_path / "b.gpkg", "--ground-size", "320")
    assert result.exit_code == 1
    assert lines[0]["status"] == "failed" and "projected CRS" in lines[0]["error"]
    assert lines[-1]["windows"] > 0 and (tmp_path / "b.gpkg").is_file()
    assert not (tmp_path / "a.gpkg").exists()
    result, _ = _suggest(fitted_checkpoint, raster, "-o", tmp_path / "c.gpkg", "--ground-size", "0")
    assert result.exit_code == 2 and "> 0" in result.output
    assert UTM33.is_projected

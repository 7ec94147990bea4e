"""Area-of-interest predict: --bbox (in the raster's CRS or another) and --aoi polygons write
only their window, whose labels are the whole raster's there (a clip: only the crops the
window depends on run); pixels outside the polygons are nodata."""

from __future__ import annotations

import json

import magseg.cli.predict  # noqa: F401  (registers the command)
import numpy as np
import pyogrio.raw
import pytest
import rasterio
import shapely
from geotiff import TRANSFORM, UTM33, read_raster, smooth_image, write_raster
from magseg.cli.app import app
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from rasterio.windows import transform as window_transform
from typer.testing import CliRunner

from magseg.io.raster import NODATA

IMAGE = smooth_image(3, 60, 80, seed=11)
# Rows 10..30 and columns 20..50 of the raster, in its CRS (10 m pixels).
X0, Y0 = TRANSFORM @ (20, 10)
X1, Y1 = TRANSFORM @ (50, 30)


def _predict(*args):
    return CliRunner().invoke(app, ["predict", *map(str, args)])


def _records(result):
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_a_bbox_is_a_clip_of_the_whole_rasters_labels(tmp_path, fitted_checkpoint):
    path = write_raster(tmp_path / "scene.tif", IMAGE)
    fp32 = ("--set", "engine.precision=fp32")
    result = _predict(fitted_checkpoint, path, "-o", tmp_path / "aoi", "--bbox", f"{X0},{Y1},{X1},{Y0}", *fp32)
    assert result.exit_code == 0, result.output
    [record] = _records(result)
    assert (record["height"], record["width"]) == (20, 30)
    labels, profile = read_raster(tmp_path / "aoi" / "scene.tif")
    window = Window(20, 10, 30, 20)
    assert profile["transform"] == window_transform(window, TRANSFORM) and profile["crs"] == UTM33
    # The whole raster's labels on those pixels, bit for bit: the window was segmented as
    # part of the whole raster (its stages' crops and context), not as a scene of its own.
    whole = _predict(fitted_checkpoint, path, "-o", tmp_path / "whole", *fp32)
    assert whole.exit_code == 0, whole.output
    np.testing.assert_array_equal(labels[0], read_raster(tmp_path / "whole" / "scene.tif")[0][0, 10:30, 20:50])
    # Only the crops the window depends on ran: on this small raster, with the blend's
    # neighbours, that is nearly all (test_clip counts them on a larger image).
    assert 0 < record["crops"] <= _records(whole)[0]["crops"]


def test_a_bbox_in_another_crs_covers_the_area_it_names(tmp_path, fitted_checkpoint):
    path = write_raster(tmp_path / "scene.tif", IMAGE)
    lon_lat = transform_bounds(UTM33, "EPSG:4326", X0, Y1, X1, Y0)
    result = _predict(fitted_checkpoint, path, "-o", tmp_path / "out", "--bbox", ",".join(map(str, lon_lat)),
                      "--bbox-crs", "EPSG:4326")
    assert result.exit_code == 0, result.output
    with rasterio.open(tmp_path / "out" / "scene.tif") as src:
        left, bottom, right, top = src.bounds
    # Whole pixels around the (slightly wider, reprojected) box: it contains the requested one.
    assert left <= X0 and right >= X1 and bottom <= Y1 and top >= Y0
    assert right - left <= (X1 - X0) + 40 and top - bottom <= (Y0 - Y1) + 40


def test_aoi_polygons_leave_everything_outside_them_nodata(tmp_path, fitted_checkpoint):
    path = write_raster(tmp_path / "scene.tif", IMAGE)
    triangle = shapely.Polygon([(X0, Y1), (X1, Y1), (X0, Y0)])
    aoi = tmp_path / "aoi.gpkg"
    pyogrio.raw.write(aoi, shapely.to_wkb(np.array([triangle])), [np.array([1])], ["id"],
                      geometry_type="Polygon", crs="EPSG:32633")
    result = _predict(fitted_checkpoint, path, "-o", tmp_path / "out", "--aoi", aoi)
    assert result.exit_code == 0, result.output
    labels, profile = read_raster(tmp_path / "out" / "scene.tif")
    assert labels.shape == (1, 20, 30)
    rows, cols = np.mgrid[0:20, 0:30]
    xs, ys = profile["transform"] @ (cols + 0.5, rows + 0.5)
    centre_inside = shapely.contains_xy(triangle, xs, ys)
    assert (labels[0][~centre_inside] == NODATA).all()
    assert (labels[0][centre_inside] != NODATA).all()
    # Inside the polygons: the whole raster's labels (the engine saw the pixels outside them).
    whole = _predict(fitted_checkpoint, path, "-o", tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    want = read_raster(tmp_path / "whole" / "scene.tif")[0][0, 10:30, 20:50]
    np.testing.assert_array_equal(labels[0][centre_inside], want[centre_inside])


def test_an_aoi_outside_the_raster_fails_that_input_alone(tmp_path, fitted_checkpoint):
    inside = write_raster(tmp_path / "inside.tif", IMAGE)
    far = write_raster(tmp_path / "far.tif", IMAGE, transform=TRANSFORM @ TRANSFORM.translation(10_000, 0))
    result = _predict(fitted_checkpoint, inside, far, "-o", tmp_path / "out", "--bbox", f"{X0},{Y1},{X1},{Y0}")
    assert result.exit_code == 1, result.output
    records = {r["input"]: r for r in _records(result)}
    assert records[str(inside)]["status"] == "ok"
    assert records[str(far)]["status"] == "failed" and "outside the raster" in records[str(far)]["error"]


@pytest.mark.parametrize("args, message", [
    (["--bbox", "1,2,3", ], "four numbers"),
    (["--bbox", "3,2,1,4"], "minx < maxx"),
    (["--bbox-crs", "EPSG:4326"], "add --bbox"),
    (["--bbox", "0,0,1,1", "--bbox-crs", "EPSG:nope"], "not a CRS"),
    (["--bbox", "0,0,1,1", "--aoi", "x.geojson"], "not both"),
])
def test_bad_areas_are_usage_errors(tmp_path, fitted_checkpoint, args, message):
    path = write_raster(tmp_path / "scene.tif", IMAGE)
    result = _predict(fitted_checkpoint, path, "-o", tmp_path / "out", *args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_a_bbox_outside_the_raster_names_the_raster_extent_in_both_crs():
    from magseg.io.aoi import bbox
    from magseg.errors import RasterError
    from rasterio.crs import CRS

    crs = CRS.from_user_input(UTM33)
    west, north = TRANSFORM @ (0, 0)
    east, south = TRANSFORM @ (80, 60)
    with pytest.raises(RasterError) as err:
        bbox(f"{east + 100},{south},{east + 200},{north}").window(TRANSFORM, (60, 80), crs, "s.tif")
    message = str(err.value)
    assert "outside the raster" in message and f"--bbox {east + 100:g}" in message
    assert f"the raster covers {west:.10g},{south:.10g},{east:.10g},{north:.10g} in EPSG:32633" in message
    # A box in another CRS: the extent in that CRS too, to copy into --bbox.
    lon = transform_bounds(crs, "EPSG:4326", west, south, east, north)
    with pytest.raises(RasterError, match="in EPSG:4326") as err:
        bbox("0,0,1,1", "EPSG:4326").window(TRANSFORM, (60, 80), crs, "s.tif")
    assert ",".join(f"{v:.10g}" for v in lon) in str(err.value)

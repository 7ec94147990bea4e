"""magseg.io.vector: class maps to polygons in strips, read back with pyogrio and checked against
connected components and pixel areas counted on the raster."""

from __future__ import annotations

import struct
from xml.etree import ElementTree
import json
import warnings

import numpy as np
import pyogrio
import pyogrio.raw
import pytest
import rasterio
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.transform import from_origin
from scipy import ndimage

from magseg.io.vector import LAYER, STYLES_LAYER, VECTOR_FORMATS, VectorError, VectorOptions, polygonize
from magseg.io.raster import VALUE_MAX

NAMES = ["background", "building", "road"]
PIXEL = 0.5  # metres, UTM 33N


def _labels(path, labels, nodata=255, crs="EPSG:32633"):
    height, width = labels.shape
    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=1, dtype="uint8",
                       nodata=nodata, crs=crs, transform=from_origin(500000, 4000000, PIXEL, PIXEL)) as dst:
        dst.write(labels, 1)
    return path


def _read(path):
    meta, _, geometries, fields = pyogrio.raw.read(path, layer=LAYER)
    columns = dict(zip(meta["fields"], fields))
    return meta, shapely.from_wkb(geometries), columns


def _random_labels(rng, height, width):
    """Blobs of 3 classes with speckle and nodata: regions of every shape cross strip borders."""
    smooth = ndimage.zoom(rng.random((5, 5)), (height / 5, width / 5), order=1)[:height, :width]
    labels = np.minimum(smooth * 3, 2).astype(np.uint8)
    speckle = rng.random((height, width))
    labels[speckle < 0.04] = rng.integers(0, 3)
    labels[speckle > 0.97] = 255
    return labels


@settings(max_examples=25, deadline=None)
@given(height=st.integers(1, 50), width=st.integers(1, 50), rows=st.sampled_from([1, 2, 5, 17, None]),
       seed=st.integers(0, 2**16))
def test_one_polygon_per_region_and_area_is_pixel_count_times_pixel_area(tmp_path_factory, height, width,
                                                                         rows, seed):
    labels = _random_labels(np.random.default_rng(seed), height, width)
    tmp = tmp_path_factory.mktemp("v")
    summary = polygonize(_labels(tmp / "labels.tif", labels), tmp / "out.gpkg", NAMES,
                         VectorOptions(strip_rows=rows))
    meta, polygons, columns = _read(tmp / "out.gpkg")
    assert meta["fields"].tolist() == ["class_id", "class_name", "area"]
    for c, name in enumerate(NAMES):
        mine = columns["class_id"] == c
        # 4-connected components of the class, counted on the raster: one polygon each.
        assert mine.sum() == ndimage.label(labels == c)[1]
        expected = (labels == c).sum() * PIXEL * PIXEL
        assert shapely.area(polygons[mine]).sum() == pytest.approx(expected, abs=1e-6)
        assert columns["area"][mine].sum() == pytest.approx(expected, abs=1e-6)
        assert summary.area.get(c, 0.0) == pytest.approx(expected, abs=1e-6)
        assert set(columns["class_name"][mine]) <= {name}
    assert summary.polygons == len(polygons)
    assert shapely.is_valid(polygons).all()


def test_a_region_crossing_strip_borders_is_one_polygon_by_hand(tmp_path):
    # A U of class 1: its two arms are separate in the strips above row 4 and join in the
    # bottom bar; a lone class-1 pixel touches the U only at a corner (no 4-connection).
    labels = np.zeros((6, 7), np.uint8)
    labels[0:5, 1] = 1
    labels[0:5, 4] = 1
    labels[4, 1:5] = 1
    labels[5, 5] = 1  # diagonal to (4, 4)
    _labels(tmp_path / "u.tif", labels)
    polygonize(tmp_path / "u.tif", tmp_path / "u.gpkg", NAMES, VectorOptions(strip_rows=2))
    _, polygons, columns = _read(tmp_path / "u.gpkg")
    ones = polygons[columns["class_id"] == 1]
    assert len(ones) == 2
    areas = sorted(shapely.area(ones) / PIXEL**2)
    assert areas == [1.0, 12.0]  # the arms (5 + 5) and the bar between them (2)
    u = ones[np.argmax(shapely.area(ones))]
    # Its outline, in the raster's CRS: the bounds of columns 1..4, rows 0..4.
    assert u.bounds == (500000 + 1 * PIXEL, 4000000 - 5 * PIXEL, 500000 + 5 * PIXEL, 4000000)
    # The background around and inside the U is one region with the U as a bay, not a hole.
    assert (columns["class_id"] == 0).sum() == ndimage.label(labels == 0)[1]


@pytest.mark.parametrize("fmt", ["gpkg", "fgb", "geojson"])
def test_every_format_opens_with_the_crs_and_class_names(tmp_path, fmt):
    labels = np.array([[0, 0, 1], [2, 2, 1]], np.uint8)
    out = tmp_path / f"labels.{fmt}"
    polygonize(_labels(tmp_path / "l.tif", labels), out, NAMES, VectorOptions(format=fmt))
    info = pyogrio.read_info(out, layer=LAYER)
    assert info["features"] == 3 and "32633" in info["crs"]
    _, _, columns = _read(out)
    assert sorted(columns["class_name"]) == ["background", "building", "road"]


@pytest.mark.parametrize("fmt", ["gpkg", "fgb", "geojson"])
def test_a_temporary_name_still_gives_one_file_of_the_format(tmp_path, fmt, monkeypatch):
    """magseg writes under ``.<name>.<pid>@<host>.partial``: FlatGeobuf made a directory of
    layers for a name without ``.fgb``, and the published ``<stem>.fgb`` was a directory.
    Appends (several flushes) included."""
    import magseg.io.vector

    monkeypatch.setattr(magseg.io.vector, "FLUSH_EVERY", 1)
    labels = np.array([[0, 0, 1], [2, 2, 1]], np.uint8)
    temp = tmp_path / f".labels.{fmt}.123@host.partial"
    polygonize(_labels(tmp_path / "l.tif", labels), temp, NAMES, VectorOptions(format=fmt))
    assert temp.is_file() and sorted(p.name for p in tmp_path.iterdir()) == sorted(["l.tif", temp.name])
    with warnings.catch_warnings():  # GDAL reading a GeoPackage named .partial says so
        warnings.simplefilter("ignore", RuntimeWarning)
        assert pyogrio.read_info(temp, layer=LAYER)["features"] == 3
    assert VECTOR_FORMATS[fmt][0] in pyogrio.list_drivers()


def test_min_area_and_simplify(tmp_path):
    labels = np.zeros((20, 20), np.uint8)
    labels[2:4, 2:4] = 1            # 4 px = 1 m²
    labels[8:18, 8:18] = 2          # 100 px = 25 m²
    _labels(tmp_path / "l.tif", labels)
    summary = polygonize(tmp_path / "l.tif", tmp_path / "big.gpkg", NAMES, VectorOptions(min_area=2.0))
    _, polygons, columns = _read(tmp_path / "big.gpkg")
    assert sorted(columns["class_id"]) == [0, 2] and summary.polygons == 2 and 1 not in summary.area
    polygonize(tmp_path / "l.tif", tmp_path / "simple.gpkg", NAMES, VectorOptions(simplify=0.5))
    _, simple, columns = _read(tmp_path / "simple.gpkg")
    square = simple[columns["class_id"] == 2][0]
    assert shapely.get_num_coordinates(square) == 5 and square.area == pytest.approx(25.0)


def test_an_all_nodata_map_gives_an_empty_layer(tmp_path):
    _labels(tmp_path / "l.tif", np.full((4, 5), 255, np.uint8))
    summary = polygonize(tmp_path / "l.tif", tmp_path / "e.gpkg", NAMES)
    assert summary.polygons == 0 and pyogrio.read_info(tmp_path / "e.gpkg", layer=LAYER)["features"] == 0


def test_bad_options_and_unreadable_input_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown vector format 'shp'"):
        VectorOptions(format="shp")
    with pytest.raises(ValueError, match="--min-area"):
        VectorOptions(min_area=-1)
    with pytest.raises(VectorError, match="cannot read class map"):
        polygonize(tmp_path / "missing.tif", tmp_path / "x.gpkg", NAMES)


def _predict(*args):
    import magseg.cli.predict  # noqa: F401  (registers the command)
    from magseg.cli.app import app
    from typer.testing import CliRunner

    return CliRunner().invoke(app, ["predict", *map(str, args)])


def test_predict_writes_the_polygons_of_its_class_map(tmp_path, fitted_checkpoint):
    import json

    from geotiff import read_raster, smooth_image, write_raster

    image = smooth_image(3, 90, 110, seed=5)
    path = write_raster(tmp_path / "scene.tif", image)
    out = tmp_path / "out"
    result = _predict(fitted_checkpoint, path, "-o", out, "--vector", "gpkg")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.splitlines()[0])
    assert record["outputs"]["vector"] == str(out / "scene.gpkg")
    # Both open styled in QGIS: the class map by scene.qml beside it, the polygons by the
    # GeoPackage's layer_styles.
    assert record["outputs"]["style"] == str(out / "scene.qml")
    palette = ElementTree.parse(out / "scene.qml").getroot().find("pipe/rasterrenderer/colorPalette")
    assert [(e.get("value"), e.get("label")) for e in palette] == [("0", "unknown"), ("1", "field"),
                                                                   ("2", "road"), ("3", "water")]
    assert STYLES_LAYER in pyogrio.list_layers(out / "scene.gpkg")[:, 0]
    labels, profile = read_raster(out / "scene.tif")
    _, polygons, columns = _read(out / "scene.gpkg")
    pixel = abs(profile["transform"].a * profile["transform"].e)
    for c in np.unique(labels[0][labels[0] != 255]):
        mine = columns["class_id"] == c
        assert shapely.area(polygons[mine]).sum() == pytest.approx((labels[0] == c).sum() * pixel)
        assert mine.sum() == ndimage.label(labels[0] == c)[1]

    # The class map is there and the polygons are not: polygonise it, segment nothing.
    (out / "scene.gpkg").unlink()
    again = _predict(fitted_checkpoint, path, "-o", out, "--vector", "fgb")
    assert again.exit_code == 0, again.output
    record = json.loads(again.stdout.splitlines()[0])
    assert record["status"] == "ok" and record["windows"] == 0
    assert pyogrio.read_info(out / "scene.fgb", layer=LAYER)["features"] == len(polygons)
    assert (out / "scene.fgb").is_file()  # one file, as the README says, not a directory


def test_polygon_options_without_vector_are_a_usage_error(tmp_path, fitted_checkpoint):
    result = _predict(fitted_checkpoint, tmp_path / "x.tif", "-o", tmp_path / "out", "--min-area", "5")
    assert result.exit_code == 2 and "--vector" in result.output


def test_geopackage_is_version_1_2_and_carries_its_qgis_style(tmp_path):
    labels = np.array([[0, 0, 1], [2, 2, 1]], np.uint8)
    colours = [(10, 20, 30), (200, 0, 0), (0, 128, 255)]
    polygonize(_labels(tmp_path / "l.tif", labels), tmp_path / "out.gpkg", NAMES, colors=colours)
    header = (tmp_path / "out.gpkg").read_bytes()[:100]
    # application_id 'GPKG' and user_version 10200: GDAL 3.6 reads 1.2 without its "only
    # partially supported" warning about 1.4.
    assert header[68:72] == b"GPKG" and struct.unpack(">i", header[60:64])[0] == 10200
    _, _, _, fields = pyogrio.raw.read(tmp_path / "out.gpkg", layer=STYLES_LAYER)
    meta = pyogrio.read_info(tmp_path / "out.gpkg", layer=STYLES_LAYER)
    row = {name: values[0] for name, values in zip(meta["fields"], fields)}
    assert row["f_table_name"] == LAYER and row["f_geometry_column"] == "geom" and row["useAsDefault"]
    qml = ElementTree.fromstring(row["styleQML"].split("\n", 1)[1])
    renderer = qml.find("renderer-v2")
    assert renderer.get("type") == "categorizedSymbol" and renderer.get("attr") == "class_id"
    assert [(c.get("value"), c.get("label")) for c in renderer.find("categories")] == [
        ("0", "background"), ("1", "building"), ("2", "road")]
    fills = [s.find("layer/Option/Option[@name='color']").get("value") for s in renderer.find("symbols")]
    assert fills == ["10,20,30,255", "200,0,0,255", "0,128,255,255"]
    # The polygons are as they were: the style is one more table.
    assert len(_read(tmp_path / "out.gpkg")[1]) == 3
    # Without colours (the library call of old), no style table.
    polygonize(tmp_path / "l.tif", tmp_path / "plain.gpkg", NAMES)
    assert STYLES_LAYER not in pyogrio.list_layers(tmp_path / "plain.gpkg")[:, 0]


def _vectorize(*args):
    import magseg.cli.vectorize  # noqa: F401  (registers the command)
    from magseg.cli.app import app
    from typer.testing import CliRunner

    return CliRunner().invoke(app, ["vectorize", *map(str, args)])


def test_vectorize_makes_predicts_layer_from_the_class_map_on_disk(tmp_path, fitted_checkpoint):
    """`magseg vectorize LABELS.tif`: the polygons predict --vector makes, from the class map
    alone, with the same options; a re-run skips, other options remake the layer, and a file
    magseg did not make is in the way unless --overwrite."""
    import json

    from geotiff import smooth_image, write_raster

    path = write_raster(tmp_path / "scene.tif", smooth_image(3, 90, 110, seed=5))
    out = tmp_path / "out"
    assert _predict(fitted_checkpoint, path, "-o", out, "--vector", "gpkg", "--min-area", "2").exit_code == 0
    _, expected, expected_columns = _read(out / "scene.gpkg")

    layers = tmp_path / "layers"
    result = _vectorize(out / "scene.tif", "-o", layers, "--min-area", "2")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["status"] == "ok" and record["output"] == str(layers / "scene.gpkg")
    _, polygons, columns = _read(layers / "scene.gpkg")
    assert record["polygons"] == len(polygons) == len(expected)
    assert sorted(columns["class_name"]) == sorted(expected_columns["class_name"])
    assert shapely.area(polygons).sum() == pytest.approx(shapely.area(expected).sum())
    assert sum(record["area"].values()) == pytest.approx(shapely.area(polygons).sum())
    metadata = pyogrio.read_info(layers / "scene.gpkg", layer=LAYER)["layer_metadata"]
    with rasterio.open(out / "scene.tif") as src:
        assert metadata["MAGSEG_CHECKPOINT_SHA256"] == src.tags()["MAGSEG_CHECKPOINT_SHA256"]

    assert json.loads(_vectorize(out / "scene.tif", "-o", layers, "--min-area", "2").stdout)["status"] == "skipped"
    fewer = json.loads(_vectorize(out / "scene.tif", "-o", layers, "--min-area", "1e9").stdout)
    assert fewer["status"] == "ok" and fewer["polygons"] == 0
    assert pyogrio.read_info(layers / "scene.gpkg", layer=LAYER)["features"] == 0

    (layers / "scene.fgb").write_bytes(b"not a layer")
    refused = _vectorize(out / "scene.tif", "-o", layers, "--format", "fgb")
    assert refused.exit_code == 1 and "is in the way" in json.loads(refused.stdout)["error"]
    assert (layers / "scene.fgb").read_bytes() == b"not a layer"
    replaced = _vectorize(out / "scene.tif", "-o", layers, "--format", "fgb", "--overwrite")
    assert replaced.exit_code == 0 and (layers / "scene.fgb").is_file()
    assert pyogrio.read_info(layers / "scene.fgb", layer=LAYER)["features"] == len(expected)


def test_vectorize_refuses_what_is_not_a_class_map_alone(tmp_path):
    from geotiff import smooth_image, write_raster

    image = write_raster(tmp_path / "image.tif", smooth_image(3, 20, 20))
    labels = _labels(tmp_path / "l.tif", np.array([[0, 1], [1, 1]], np.uint8))
    result = _vectorize(image, labels)
    assert result.exit_code == 1
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert first["status"] == "failed" and "not a class map" in first["error"]
    assert second["status"] == "ok" and (tmp_path / "l.gpkg").is_file()
    assert "1 of 2 class map(s) failed" in result.stderr
    missing = _vectorize(tmp_path / "missing.tif")
    assert missing.exit_code == 1 and "no such file" in json.loads(missing.stdout)["error"]
def _uncertainty(path, values):
    height, width = values.shape
    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=1, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 4000000, PIXEL, PIXEL)) as dst:
        dst.write(values, 1)
    return path


@settings(max_examples=20, deadline=None)
@given(height=st.integers(1, 40), width=st.integers(1, 40), rows=st.sampled_from([1, 3, 7, None]),
       seed=st.integers(0, 2**16))
def test_polygons_carry_mean_and_least_confidence_of_their_pixels(tmp_path_factory, height, width, rows, seed):
    # Each polygon's confidence (1 - uncertainty / VALUE_MAX) is its region's, counted on the
    # raster by 4-connected components, however the strips cut the regions.
    rng = np.random.default_rng(seed)
    labels = _random_labels(rng, height, width)
    uncert = rng.integers(0, VALUE_MAX + 1, (height, width), dtype=np.uint8)
    tmp = tmp_path_factory.mktemp("c")
    polygonize(_labels(tmp / "labels.tif", labels), tmp / "out.gpkg", NAMES, VectorOptions(strip_rows=rows),
               uncertainty=_uncertainty(tmp / "u.tif", uncert))
    meta, _, columns = _read(tmp / "out.gpkg")
    assert meta["fields"].tolist() == ["class_id", "class_name", "area", "mean_confidence", "min_confidence"]
    got = sorted(zip(columns["class_id"].tolist(), np.round(columns["area"] / PIXEL**2).astype(int).tolist(),
                     np.round(columns["mean_confidence"], 9).tolist(), np.round(columns["min_confidence"], 9).tolist()))
    confidence = 1 - uncert / VALUE_MAX
    expected = []
    for c in range(len(NAMES)):
        components, n = ndimage.label(labels == c)  # 4-connectivity
        for k in range(1, n + 1):
            px = confidence[components == k]
            expected.append((c, px.size, round(float(px.mean()), 9), round(float(px.min()), 9)))
    assert got == sorted(expected)


def test_predict_vector_with_uncertainty_has_confidence_columns(tmp_path, fitted_checkpoint):
    import magseg.cli.predict  # noqa: F401  (registers the command)
    from geotiff import smooth_image, write_raster
    from magseg.cli.app import app
    from typer.testing import CliRunner

    scene = write_raster(tmp_path / "scene.tif", smooth_image(3, 40, 50))
    result = CliRunner().invoke(app, ["predict", str(fitted_checkpoint), str(scene), "-o", str(tmp_path / "out"),
                                      "--vector", "gpkg", "--uncertainty"])
    assert result.exit_code == 0, result.output
    _, _, columns = _read(tmp_path / "out" / "scene.gpkg")
    assert (columns["min_confidence"] <= columns["mean_confidence"] + 1e-12).all()
    assert ((columns["min_confidence"] >= 0) & (columns["mean_confidence"] <= 1)).all()
    result = CliRunner().invoke(app, ["predict", str(fitted_checkpoint), str(scene), "-o", str(tmp_path / "plain"),
                                      "--vector", "gpkg"])
    assert result.exit_code == 0, result.output
    meta, _, _ = _read(tmp_path / "plain" / "scene.gpkg")
    assert meta["fields"].tolist() == ["class_id", "class_name", "area"]  # no uncertainty, no columns

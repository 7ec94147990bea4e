"""Where predict's outputs go and how GDAL writes them: ``-o FILE.tif`` for one input, and
``--co`` creation options (checked before any work, GDAL's message on a bad one)."""

from __future__ import annotations

import json

import magseg.cli.predict  # noqa: F401  (registers the command)
import pytest
import rasterio
from geotiff import smooth_image, write_raster
from magseg.cli.app import app
from typer.testing import CliRunner


def _predict(*args):
    return CliRunner().invoke(app, ["predict", *map(str, args)])


def test_o_file_tif_with_one_input_writes_that_file(tmp_path, fitted_checkpoint):
    path = write_raster(tmp_path / "scene.tif", smooth_image(3, 40, 50))
    result = _predict(fitted_checkpoint, path, "-o", tmp_path / "out" / "result.tif", "--probs")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["output"] == str(tmp_path / "out" / "result.tif")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["result.qml", "result.tif", "result.tif.aux.xml",
                                                                 "result_probs.tif"]
    with rasterio.open(tmp_path / "out" / "result.tif") as src:
        assert (src.height, src.width) == (40, 50)


def test_o_file_tif_with_several_inputs_is_a_usage_error(tmp_path, fitted_checkpoint):
    a = write_raster(tmp_path / "a.tif", smooth_image(3, 20, 20))
    b = write_raster(tmp_path / "b.tif", smooth_image(3, 20, 20))
    result = _predict(fitted_checkpoint, a, b, "-o", tmp_path / "out" / "result.tif")
    assert result.exit_code == 2 and "2 inputs" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cog", [False, True])
def test_creation_options_reach_gdal(tmp_path, fitted_checkpoint, cog):
    path = write_raster(tmp_path / "scene.tif", smooth_image(3, 40, 50))
    extra = ["--cog"] if cog else []
    result = _predict(fitted_checkpoint, path, "-o", tmp_path / "out", "--co", "COMPRESS=LZW", *extra)
    assert result.exit_code == 0, result.output
    with rasterio.open(tmp_path / "out" / "scene.tif") as src:
        assert src.compression.name == "lzw"


@pytest.mark.parametrize("option, message", [
    ("FOO=BAR", "does not support creation option FOO"),
    ("PREDICTOR=9", "PREDICTOR=9"),
    ("COMPRESS", "is not KEY=VALUE"),
])
def test_a_bad_creation_option_is_a_usage_error_before_any_work(tmp_path, fitted_checkpoint, option, message):
    path = write_raster(tmp_path / "scene.tif", smooth_image(3, 20, 20))
    result = _predict(fitted_checkpoint, path, "-o", tmp_path / "out", "--co", option)
    assert result.exit_code == 2, result.output
    assert message in result.output and result.stdout == ""
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_class_names_sit_beside_the_class_map_for_gis_tools(tmp_path, fitted_checkpoint):
    import shutil
    import subprocess
    from xml.etree import ElementTree as ET

    path = write_raster(tmp_path / "scene.tif", smooth_image(3, 30, 40))
    result = _predict(fitted_checkpoint, path, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    sidecar = tmp_path / "out" / "scene.tif.aux.xml"
    assert json.loads(result.stdout)["outputs"]["categories"] == str(sidecar)
    names = ["unknown", "field", "road", "water"]  # configs/tiny.yaml
    band = ET.parse(sidecar).getroot().find("PAMRasterBand")
    assert [c.text for c in band.find("CategoryNames")] == names
    rows = [[f.text for f in row] for row in band.find("GDALRasterAttributeTable").findall("Row")]
    assert rows == [["0", "unknown", "0", "0", "0"], ["1", "field", "255", "255", "0"],
                    ["2", "road", "255", "255", "255"], ["3", "water", "0", "0", "255"]]
    with rasterio.open(tmp_path / "out" / "scene.tif") as src:  # GDAL reads the map as before
        assert src.colormap(1)[1][:3] == (255, 255, 0)
    if shutil.which("gdalinfo"):  # GDAL's own listing, where its tools are installed
        info = subprocess.run(["gdalinfo", str(tmp_path / "out" / "scene.tif")], capture_output=True,
                              text=True, check=True).stdout
        assert "Categories:" in info and "3: water" in info

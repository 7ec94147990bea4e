"""Rasters that are not local files: URL and /vsi names kept intact from the command line to
GDAL, outputs named after the last component, a zip made in the test, and an HTTP server with
byte ranges on 127.0.0.1 that the test starts."""

from __future__ import annotations

import io
import os
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import magseg.cli.predict  # noqa: F401  (registers the command)
import numpy as np
import pytest
from geotiff import read_raster, smooth_image, write_raster
from magseg.cli.app import app
from magseg.cli.common import expand_inputs
from typer.testing import CliRunner

from magseg.run.predict import INPUT_SUFFIXES
from magseg.io.sources import base_name, gdal_name, is_virtual, stem


@pytest.mark.parametrize("name, gdal, base", [
    ("s3://bucket/tiles/x.tif", "/vsis3/bucket/tiles/x.tif", "x.tif"),
    ("gs://bucket/q.jp2", "/vsigs/bucket/q.jp2", "q.jp2"),
    ("az://container/blob/w.tiff", "/vsiaz/container/blob/w.tiff", "w.tiff"),
    ("https://host:8080/d/y.tif?sig=a/b", "/vsicurl/https://host:8080/d/y.tif?sig=a/b", "y.tif"),
    ("/vsicurl/https://host/z.tif", "/vsicurl/https://host/z.tif", "z.tif"),
    ("/vsizip/scenes.zip/000010.tif", "/vsizip/scenes.zip/000010.tif", "000010.tif"),
    ("/vsis3/b/k/v.tif", "/vsis3/b/k/v.tif", "v.tif"),
])
def test_urls_map_to_gdal_names_and_outputs_are_named_after_the_last_component(name, gdal, base):
    assert is_virtual(name) and gdal_name(name) == gdal and base_name(name) == base
    assert stem(name) == Path(base).stem


def test_local_paths_are_not_virtual():
    for name in ("scene.tif", "dir/scene.tif", Path("/data/vsi.tif"), "/data/https.tif"):
        assert not is_virtual(name) and base_name(name) == Path(name).name


def test_virtual_names_pass_the_input_list_intact():
    names = ["s3://bucket/key/x.tif", "/vsicurl/https://host/a/b.tif", "https://host/c.tif"]
    assert expand_inputs(names, INPUT_SUFFIXES) == names
    assert expand_inputs(["-"], INPUT_SUFFIXES, stdin=io.StringIO("\n".join(names) + "\n")) == names


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """``(directory, base URL)`` of a range-capable HTTP server on 127.0.0.1
    (tests/range_server.py, in its own process)."""
    root = tmp_path / "served"
    root.mkdir()
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("range_server.py")), str(root)],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())  # printed once the socket listens
        yield root, f"http://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()


def _predict(*args, stdin=None):
    return CliRunner().invoke(app, ["predict", *map(str, args)], input=stdin)


def _records(result):
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_predict_reads_a_raster_inside_a_zip(tmp_path, fitted_checkpoint):
    local = write_raster(tmp_path / "000010.tif", smooth_image(3, 70, 90, seed=2))
    with zipfile.ZipFile(tmp_path / "scenes.zip", "w") as archive:
        archive.write(local, "000010.tif")
    result = _predict(fitted_checkpoint, f"/vsizip/{tmp_path / 'scenes.zip'}/000010.tif", "-o", tmp_path / "z")
    assert result.exit_code == 0, result.output
    [record] = _records(result)
    assert record["status"] == "ok" and record["input"] == f"/vsizip/{tmp_path / 'scenes.zip'}/000010.tif"
    assert _predict(fitted_checkpoint, local, "-o", tmp_path / "plain").exit_code == 0
    zipped, profile = read_raster(tmp_path / "z" / "000010.tif")
    plain, _ = read_raster(tmp_path / "plain" / "000010.tif")
    np.testing.assert_array_equal(zipped, plain)
    assert profile["crs"] is not None


def test_predict_reads_rasters_over_http_and_a_missing_one_fails_alone(tmp_path, fitted_checkpoint, http_root):
    root, url = http_root
    write_raster(root / "a.tif", smooth_image(3, 60, 80, seed=3))
    write_raster(root / "b.tif", smooth_image(3, 50, 40, seed=4))
    names = [f"/vsicurl/{url}/a.tif", f"{url}/missing.tif", f"{url}/b.tif"]
    result = _predict(fitted_checkpoint, "-", "-o", tmp_path / "out", stdin="\n".join(names) + "\n")
    assert result.exit_code == 1, result.output
    records = {r["input"]: r for r in _records(result)}
    assert [records[n]["status"] for n in names] == ["ok", "failed", "ok"]
    assert "missing.tif" in records[names[1]]["error"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.qml", "a.tif", "a.tif.aux.xml",
                                                                    "b.qml", "b.tif", "b.tif.aux.xml"]
    labels, _ = read_raster(tmp_path / "out" / "b.tif")
    assert labels.shape == (1, 50, 40)


def test_a_name_that_is_not_utf8_opens_with_its_sidecars(tmp_path):
    """rasterio encodes names as UTF-8: such a name is opened through a link with a UTF-8
    name, and the files GDAL looks for beside it (a world file, a .msk) come along."""
    import numpy as np
    import rasterio

    from magseg.io.sources import encodable, gdal_path

    name = os.fsdecode(b"sc\xe8ne")
    image = np.full((3, 4, 5), 9, np.uint8)
    with rasterio.open(tmp_path / "plain.png", "w", driver="PNG", width=5, height=4, count=3,
                       dtype="uint8", transform=rasterio.Affine(2, 0, 0, 0, -2, 0)) as dst:
        dst.write(image)
    (tmp_path / "plain.png.aux.xml").unlink(missing_ok=True)
    (tmp_path / "plain.png").rename(tmp_path / f"{name}.png")
    (tmp_path / f"{name}.pgw").write_text("10\n0\n0\n-10\n500000\n4000000\n")  # the world file
    assert not encodable(tmp_path / f"{name}.png")
    with gdal_path(tmp_path / f"{name}.png") as readable:
        with rasterio.open(readable) as src:
            assert src.transform.c == 500000 - 5 and src.transform.a == 10
            np.testing.assert_array_equal(src.read(), image)
    assert not os.path.exists(readable)
    with gdal_path(tmp_path / "other.tif") as same:  # a UTF-8 name is given as it is
        assert same == str(tmp_path / "other.tif")

"""Streaming raster I/O: windowed reads with validity masks, window-by-window writes, COG."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import rasterio
from geotiff import TRANSFORM, UTM33, read_raster, smooth_image, write_raster
from small_fs import fill, small_filesystem

from magseg.errors import RasterError, RasterWriteError
from magseg.geometry import Rect
from magseg.io.raster import (
    BLOCK,
    COG_BLOCK,
    NODATA,
    GeoInfo,
    RasterReader,
    RasterWriter,
    convert_to_cog,
    io_env,
    verify_raster,
)


def test_windowed_reads_give_back_the_pixels_in_band_order(tmp_path):
    image = smooth_image(4, 40, 50, seed=1)
    path = write_raster(tmp_path / "a.tif", image, tiled=True)
    with RasterReader(path, bands=[3, 1]) as reader:
        assert reader.size == (40, 50) and reader.count == 2 and reader.file_count == 4
        window = Rect(5, 7, 20, 30)
        pixels, valid = reader.read(window)
        np.testing.assert_array_equal(pixels, image[[2, 0], 5:25, 7:37])
        # nothing declared and no pixel 0 in every band -> all valid
        assert valid.shape == (20, 30) and valid.all()
        assert reader.geo.crs == UTM33 and reader.geo.transform == TRANSFORM


def test_every_pixel_is_valid_when_nothing_is_declared(tmp_path):
    """GDAL's rule: without a nodata value, mask or alpha band, every pixel is valid. Pixels
    0 in every band were taken for nodata: a JPEG mosaic lost 3,139 of them, ragged."""
    image = smooth_image(3, 20, 20, seed=2)
    image[:, :4, :] = 0        # 0 in every band: a real black pixel
    path = write_raster(tmp_path / "a.tif", image)
    with RasterReader(path) as reader:
        _, valid = reader.read(Rect(0, 0, 20, 20))
        assert valid.all()
        _, valid = reader.read_overview(10)
        assert valid.all()


@pytest.mark.parametrize("declared", [None, 7])
def test_a_nodata_value_given_to_the_reader_replaces_the_files(tmp_path, declared):
    """--nodata VALUE: pixels equal to it in every band are nodata, whatever the file says."""
    image = smooth_image(3, 20, 20, seed=2)
    image[image == 7] = 8
    image[:, :4, :] = 0        # padding: 0 in every band
    image[0, 10, 10] = 0       # 0 in one band only: valid
    image[:, 15, 15] = 7       # the file's nodata value: valid under --nodata 0
    path = write_raster(tmp_path / "a.tif", image, nodata=declared)
    with RasterReader(path, nodata=0) as reader:
        _, valid = reader.read(Rect(0, 0, 20, 20))
    expected = np.ones((20, 20), bool)
    expected[:4] = False
    np.testing.assert_array_equal(valid, expected)


def test_a_nan_nodata_value(tmp_path):
    image = smooth_image(2, 10, 10, seed=4).astype(np.float32)
    image[:, 1, 1] = np.nan
    image[0, 2, 2] = np.nan   # one band only: still invalid, as every non-finite float
    with RasterReader(write_raster(tmp_path / "a.tif", image), nodata=float("nan")) as reader:
        _, valid = reader.read(Rect(0, 0, 10, 10))
    assert not valid[1, 1] and not valid[2, 2] and valid.sum() == 98


def test_declared_nodata_is_nodata_and_real_zeros_are_valid(tmp_path):
    image = smooth_image(3, 20, 20, seed=3).astype(np.int16)
    image[:, 5, :] = -9999      # nodata in every band
    image[:, 6, :] = 0          # real zeros: valid, because a nodata value is declared
    path = write_raster(tmp_path / "a.tif", image, nodata=-9999)
    with RasterReader(path) as reader:
        _, valid = reader.read(Rect(0, 0, 20, 20))
    assert not valid[5].any() and valid[6].all() and valid.sum() == 19 * 20


def test_non_finite_floats_are_invalid(tmp_path):
    image = smooth_image(3, 10, 10, seed=4).astype(np.float32)
    image[1, 2, 3] = np.nan
    image[0, 4, 4] = np.inf
    path = write_raster(tmp_path / "a.tif", image)
    with RasterReader(path) as reader:
        _, valid = reader.read(Rect(0, 0, 10, 10))
    assert not valid[2, 3] and not valid[4, 4] and valid.sum() == 98


def test_alpha_band_masks_pixels(tmp_path):
    rgba = np.concatenate([smooth_image(3, 12, 12, seed=5), np.full((1, 12, 12), 255, np.uint8)])
    rgba[3, :, :3] = 0
    path = write_raster(tmp_path / "a.png", rgba, driver="PNG", crs=None, transform=None)
    with RasterReader(path, bands=[1, 2, 3]) as reader:
        _, valid = reader.read(Rect(0, 0, 12, 12))
        assert not reader.geo.georeferenced
    assert not valid[:, :3].any() and valid[:, 3:].all()


def test_truncated_file_is_a_raster_error_naming_it(tmp_path):
    path = write_raster(tmp_path / "a.tif", smooth_image(3, 256, 256, seed=6), tiled=True,
                        compress="deflate")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RasterError, match="a.tif"):
        with RasterReader(path) as reader:
            reader.read(Rect(0, 0, 256, 256))


def test_writer_assembles_windows_with_georeference_colours_and_names(tmp_path):
    size = (150, 170)
    labels = np.random.default_rng(0).integers(0, 4, size=size).astype(np.uint8)
    labels[:3] = NODATA
    path = tmp_path / "out.tif"
    with io_env():
        with RasterWriter(path, size, 1, GeoInfo(UTM33, TRANSFORM),
                          colors=[(0, 0, 0), (255, 255, 0), (255, 255, 255), (0, 0, 255)],
                          tags={"MAGSEG_CLASSES": json.dumps(["a", "b", "c", "d"])},
                          descriptions=["class"]) as writer:
            for top in range(0, size[0], 64):  # windows across block borders
                for left in range(0, size[1], 48):
                    w = Rect(top, left, min(64, size[0] - top), min(48, size[1] - left))
                    writer.write(labels[w.slices][None], w)
    data, profile = read_raster(path)
    np.testing.assert_array_equal(data[0], labels)
    assert profile["crs"] == UTM33 and profile["transform"] == TRANSFORM
    assert profile["dtype"] == "uint8" and profile["nodata"] == NODATA and profile["count"] == 1
    assert profile["tiled"] and profile["blockxsize"] == BLOCK and profile["compress"] == "deflate"
    assert profile["colormap"][1] == (255, 255, 0, 255) and profile["colormap"][3] == (0, 0, 255, 255)
    assert profile["colormap"][NODATA][3] == 0  # nodata is transparent
    assert json.loads(profile["tags"]["MAGSEG_CLASSES"]) == ["a", "b", "c", "d"]
    assert profile["descriptions"] == ("class",)


def test_masked_writer_stores_validity_in_an_internal_mask(tmp_path):
    values = np.arange(2 * 20 * 30, dtype=np.uint16).reshape(2, 20, 30).astype(np.uint8)
    valid = np.ones((20, 30), bool)
    valid[::3, ::4] = False
    path = tmp_path / "probs.tif"
    with RasterWriter(path, (20, 30), 2, GeoInfo(None, None), nodata=None, mask=True,
                      scale=1 / 255) as writer:
        writer.write(values[:, :, :16], Rect(0, 0, 20, 16), valid[:, :16])
        writer.write(values[:, :, 16:], Rect(0, 16, 20, 14), valid[:, 16:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NotGeoreferencedWarning from a file we made so
        data, profile = read_raster(path)
    np.testing.assert_array_equal(data, values)
    np.testing.assert_array_equal(profile["masks"][0] > 0, valid)
    assert profile["nodata"] is None and profile["crs"] is None
    assert profile["scales"] == pytest.approx((1 / 255, 1 / 255))


def test_cog_conversion_keeps_pixels_colours_tags_and_adds_overviews(tmp_path):
    size = (1100, 1300)
    labels = (np.indices(size).sum(0) // 97 % 4).astype(np.uint8)
    tiled = tmp_path / "tiled.tif"
    with RasterWriter(tiled, size, 1, GeoInfo(UTM33, TRANSFORM), colors=[(9, 9, 9)] * 4,
                      tags={"CLASS_1": "b"}) as writer:
        writer.write(labels[None], Rect(0, 0, *size))
    cog = tmp_path / "cog.tif"
    convert_to_cog(tiled, cog, "MODE")
    data, profile = read_raster(cog)
    np.testing.assert_array_equal(data[0], labels)
    assert profile["layout"].get("LAYOUT") == "COG" and profile["blockxsize"] == COG_BLOCK
    assert profile["overviews"] and profile["overviews"][0] == 2
    assert profile["colormap"][2] == (9, 9, 9, 255) and profile["tags"]["CLASS_1"] == "b"
    assert profile["transform"] == TRANSFORM and profile["nodata"] == NODATA
    with rasterio.open(cog) as src:
        overview = src.read(1, out_shape=(size[0] // 2, size[1] // 2))
    assert set(np.unique(overview)) <= {0, 1, 2, 3}  # MODE: no blended class ids


def test_unwritable_output_is_a_raster_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RasterError, match="cannot create output raster"):
        RasterWriter(blocker / "out.tif", (4, 4), 1, GeoInfo(None, None))


def _close_cuts_the_file_short(writer, keep=8192):
    """Make closing ``writer`` behave as GDAL's does on a full disk: the blocks and the
    directory it writes at close never reach the file, and nothing is raised."""
    close = writer._dst.close

    def failing_close():
        close()
        os.truncate(writer.path, min(keep, writer.path.stat().st_size - 1))

    writer._dst.close = failing_close


def test_a_file_gdal_failed_to_finish_at_close_is_an_error(tmp_path):
    path = tmp_path / "labels.tif"
    writer = RasterWriter(path, (300, 280), 1, GeoInfo(UTM33, TRANSFORM))
    writer.write(smooth_image(1, 300, 280, seed=3), Rect(0, 0, 300, 280))
    _close_cuts_the_file_short(writer)
    with pytest.raises(RasterWriteError, match="labels.tif: does not read back complete"):
        writer.close()


def test_a_masked_file_is_read_back_with_its_mask(tmp_path):
    path = tmp_path / "probs.tif"
    with RasterWriter(path, (40, 50), 2, GeoInfo(None, None), nodata=None, mask=True) as writer:
        writer.write(smooth_image(2, 40, 50), Rect(0, 0, 40, 50))
    verify_raster(path, (40, 50), 2, masked=True)
    with pytest.raises(RasterWriteError, match="instead of 3 of 40 x 50"):
        verify_raster(path, (40, 50), 3)


def test_writing_on_a_real_full_filesystem_is_an_error(tmp_path):
    """GDAL prints ``_tiffWriteProc: No space left on device`` and carries on: the writer
    must raise, whether the failure comes at a write or only at close."""
    with small_filesystem(tmp_path / "disk", size="1m") as disk:
        fill(disk, leave=4096)
        with pytest.raises(RasterWriteError, match="out.tif"):
            with io_env(), RasterWriter(disk / "out.tif", (120, 130), 3, GeoInfo(None, None)) as w:
                w.write(smooth_image(3, 120, 130), Rect(0, 0, 120, 130))


_CLOSE_AFTER_FAILED_MASK = """
import sys, numpy as np, rasterio
from rasterio.windows import Window
from magseg.io import gdal_lib
path = sys.argv[1]
with rasterio.Env():
    dst = rasterio.open(path, "w", driver="GTiff", height=600, width=600, count=4, dtype="uint8",
                        tiled=True, blockxsize=256, blockysize=256)
    dst.write(np.ones((4, 100, 100), np.uint8), window=Window(0, 0, 100, 100))
    try:
        dst.write_mask(np.full((100, 100), 255, np.uint8), window=Window(0, 0, 100, 100))
    except rasterio.errors.RasterioIOError as exc:
        print("write failed:", exc)
    print("dropped", gdal_lib.drop_cache(path))
    dst.close()
print("closed")
"""


def test_a_dataset_whose_write_failed_is_released_without_writing_again(tmp_path):
    """GDAL 3.10 corrupts the heap when a GeoTIFF whose mask band could not be made on a full
    disk is closed with its blocks still cached (``malloc(): invalid size``, exit 134):
    dropping the cached blocks first (gdal_lib.drop_cache) lets it close. In a child
    process, since the crash it guards against kills the process."""
    import subprocess
    import sys

    with small_filesystem(tmp_path / "disk", size="1m") as disk:
        fill(disk)
        run = subprocess.run([sys.executable, "-c", _CLOSE_AFTER_FAILED_MASK, str(disk / "x.tif")],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        assert "write failed" in run.stdout and "dropped 1" in run.stdout and "closed" in run.stdout


def test_a_masked_writer_on_a_full_filesystem_raises_and_closes(tmp_path):
    """The writer makes its mask band before any pixel (so the state above never arises) and
    reports the failure as a RasterWriteError naming the file; the process lives on."""
    with small_filesystem(tmp_path / "disk", size="1m") as disk:
        fill(disk)
        with pytest.raises(RasterWriteError, match="out.tif: cannot create output raster"):
            with io_env():
                RasterWriter(disk / "out.tif", (600, 600), 4, GeoInfo(None, None), nodata=None,
                             mask=True)


def test_a_gdal_failure_recorded_but_not_raised_fails_the_write_at_once(tmp_path, monkeypatch):
    """GDAL may record a failure (CPLGetLastErrorType) without rasterio raising: the write
    raises then, and the dataset is not written again; close releases it and raises too."""
    from magseg.io import gdal_lib

    calls = []
    monkeypatch.setattr(gdal_lib, "last_failure", lambda: calls.append(1) or (
        "_tiffWriteProc: No space left on device" if len(calls) == 3 else None))
    with io_env():
        writer = RasterWriter(tmp_path / "out.tif", (64, 64), 1, GeoInfo(None, None))  # call 1
        writer.write(np.ones((1, 32, 64), np.uint8), Rect(0, 0, 32, 64))  # call 2
        with pytest.raises(RasterWriteError, match="out.tif: cannot write output .*No space left"):
            writer.write(np.ones((1, 32, 64), np.uint8), Rect(32, 0, 32, 64))
        with pytest.raises(RasterWriteError, match="after a failed write"):
            writer.write(np.ones((1, 32, 64), np.uint8), Rect(32, 0, 32, 64))
        with pytest.raises(RasterWriteError, match="not written completely"):
            writer.close()
    assert writer._dst.closed
def test_raster_style_is_a_paletted_qgis_style_with_names_and_colours():
    from xml.etree import ElementTree

    from magseg.io.raster import raster_style

    qml = raster_style([(1, "road", (255, 255, 255)), (0, "field", (0, 128, 16))])
    assert qml.startswith("<!DOCTYPE qgis")
    renderer = ElementTree.fromstring(qml.split("\n", 1)[1]).find("pipe/rasterrenderer")
    assert renderer.get("type") == "paletted" and renderer.get("band") == "1"
    assert [(e.get("value"), e.get("color"), e.get("label")) for e in renderer.find("colorPalette")] == [
        ("0", "#008010", "field"), ("1", "#ffffff", "road")]

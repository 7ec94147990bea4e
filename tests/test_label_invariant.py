"""Whatever the pixels, every label predict writes is a class id or nodata (255).

Rasters of every numeric dtype, with extreme values dropped in: the dtype's limits, NaN,
+-Inf, and float64 values beyond float32's range (1e39 becomes inf once cast). A pixel that
is not finite after the cast and the normalisation is nodata, as NaN already is; a pixel the
model cannot give finite probabilities is nodata too. Complex rasters are refused."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import CONFIGS
from geotiff import read_raster, smooth_image, write_raster
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from magseg.config import load_config
from magseg.run.predict import PredictOptions, predict_input, predict_raster
from magseg.io.raster import NODATA
from magseg.segmenter import Segmenter

SMALL_SCENE = ["pyramid.scales=[8,16]", "pyramid.crop=8", "pyramid.input=16"]
DTYPES = ["uint8", "uint16", "int16", "uint32", "int32", "float32", "float64"]
SIZE = (3, 12, 14)


@pytest.fixture(scope="module")
def segmenter():
    import torch

    torch.manual_seed(0)
    return Segmenter.from_config(load_config(CONFIGS / "tiny.yaml", SMALL_SCENE))


def _extremes(dtype: str) -> list[float]:
    dt = np.dtype(dtype)
    if dt.kind == "f":
        info = np.finfo(dt)
        values = [float(info.max), float(info.min), float(info.tiny), np.nan, np.inf, -np.inf, 0.0]
        if dt == np.float64:
            values += [1e39, -1e39, 3.4e38, 1e300]
        return values
    info = np.iinfo(dt)
    return [int(info.max), int(info.min), 0, 1]


@st.composite
def rasters(draw):
    """``(dtype, (C, H, W) array)``: a smooth image with extreme values at drawn pixels."""
    dtype = draw(st.sampled_from(DTYPES))
    image = smooth_image(*SIZE, seed=draw(st.integers(0, 50))).astype(dtype)
    extremes = _extremes(dtype)
    places = draw(st.lists(
        st.tuples(st.integers(0, SIZE[0] - 1), st.integers(0, SIZE[1] - 1),
                  st.integers(0, SIZE[2] - 1), st.sampled_from(extremes)),
        min_size=1, max_size=12))
    for c, y, x, value in places:
        image[c, y, x] = value
    return dtype, image


def _not_finite_once_normalised(image: np.ndarray, config) -> np.ndarray:
    """``(H, W)``: pixels that are not finite after the float32 cast and normalisation."""
    with np.errstate(over="ignore", invalid="ignore"):
        x = image.astype(np.float32)
        mean = np.asarray(config.data.mean, np.float32)[:, None, None]
        std = np.asarray(config.data.std, np.float32)[:, None, None]
        return ~np.isfinite((x - mean) / std).all(axis=0)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raster=rasters())
@example(raster=("float64", np.where(np.arange(3 * 12 * 14).reshape(SIZE) == 50, 1e39,
                                     smooth_image(*SIZE).astype(np.float64))))
def test_every_label_is_a_class_or_nodata(segmenter, raster):
    dtype, image = raster
    classes = segmenter.num_classes
    with tempfile.TemporaryDirectory() as tmp:
        path = write_raster(Path(tmp) / "x.tif", image)
        result = predict_raster(segmenter, path, Path(tmp) / "out",
                                PredictOptions(probs=True, uncertainty=True))
        labels = read_raster(result.output)[0][0]
        probs_masks = read_raster(result.outputs["probs"])[1]["masks"]
    assert result.status == "ok"
    values = set(np.unique(labels).tolist())
    assert values <= set(range(classes)) | {NODATA}, (dtype, values)
    assert sum(result.histogram.values()) == labels.size
    # Non-finite after the cast: nodata, in the class map and in the extras' masks.
    bad = _not_finite_once_normalised(image, segmenter.config)
    assert (labels[bad] == NODATA).all()
    assert ((probs_masks[0] > 0) == (labels != NODATA)).all()


def test_float64_beyond_float32_is_nodata_and_the_rest_is_labelled(segmenter, tmp_path):
    """One pixel at 1e39 of a float64 raster: that pixel is nodata, not every pixel id C."""
    image = smooth_image(3, 64, 80).astype(np.float64)
    image[0, 10, 20] = 1e39
    result = predict_raster(segmenter, write_raster(tmp_path / "f64.tif", image), tmp_path / "out")
    labels = read_raster(result.output)[0][0]
    assert labels[10, 20] == NODATA
    assert result.histogram["nodata"] == 1
    assert (labels != NODATA).sum() == 64 * 80 - 1 and labels.max(initial=0) <= NODATA
    assert set(np.unique(labels[labels != NODATA]).tolist()) <= set(range(segmenter.num_classes))


@pytest.mark.parametrize("dtype", ["complex64", "complex128", "complex_int16"])
def test_complex_rasters_are_refused_with_a_clear_message(segmenter, tmp_path, dtype):
    path = tmp_path / "c.tif"
    if dtype == "complex_int16":
        import rasterio
        from geotiff import TRANSFORM, UTM33

        with rasterio.open(path, "w", driver="GTiff", width=10, height=8, count=3,
                           dtype="complex_int16", crs=UTM33, transform=TRANSFORM) as dst:
            dst.write(np.ones((3, 8, 10), np.complex64))
    else:
        write_raster(path, smooth_image(3, 8, 10).astype(dtype))
    record = predict_input(segmenter, path, tmp_path / "out")
    assert record["status"] == "failed"
    assert f"{path}: band(s) 1,2,3 hold complex values" in record["error"]
    assert "real-valued" in record["error"]
    assert not (tmp_path / "out" / "c.tif").exists()

"""predict_raster: the pyramid over a whole GeoTIFF, checked against in-memory references.

Scenes are made small (scales 16/32/64: a 64 px scene, 16 px crops) so that rasters of
100-300 px already run hundreds of crops over three stages.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import rasterio
import torch
from conftest import CONFIGS
from fitted_model import colour_rule
from geotiff import TRANSFORM, UTM33, read_raster, smooth_image, write_raster
from torch import nn

from magseg.config import load_config
from magseg.engine.maps import map_bytes
from magseg.engine.pyramid import crop_boxes
from magseg.errors import RasterError, WriteError
from magseg.run import streaming
from magseg.io.atomic import partial_path
from magseg.run.predict import PredictOptions, output_paths, predict_input, predict_raster
from magseg.io.raster import NODATA, VALUE_MAX
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
    path = write_raster(tmp_path / "scene.tif", image, nodata=0)
    result = predict_raster(segmenter, path, tmp_path / "out", PredictOptions(probs=True))
    assert result.status == "ok" and result.crops > 100

    with torch.no_grad():
        logits = conv(segmenter.normalize(image)[None])[0]
    expected = logits.argmax(0).numpy().astype(np.uint8)
    expected[20:30] = NODATA
    labels, profile = read_raster(tmp_path / "out" / "scene.tif")
    np.testing.assert_array_equal(labels[0], expected)

    probs, pprofile = read_raster(tmp_path / "out" / "scene_probs.tif")
    want = (logits.softmax(0) * VALUE_MAX).round().numpy()
    valid = pprofile["masks"][0] > 0
    # Nodata marked by value as well as by the mask (GDAL < 3.8 statistics read only the value).
    assert pprofile["nodata"] == NODATA and (probs[:, ~valid] == NODATA).all()
    with rasterio.open(tmp_path / "out" / "scene_probs.tif") as src, warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.RasterioDeprecationWarning)
        src.statistics(1, approx=False)  # GDALComputeRasterStatistics, as gdalinfo -stats
        assert float(src.tags(1)["STATISTICS_VALID_PERCENT"]) == pytest.approx(100 * valid.mean(), abs=0.01)
    assert not valid[20:30].any() and valid[30:].all()
    assert np.abs(probs.astype(float) - want)[:, valid].max() <= 1
    counts = np.bincount(expected.ravel(), minlength=256)
    assert result.histogram == {"unknown": counts[0], "field": counts[1], "road": counts[2],
                                "water": counts[3], "nodata": 10 * 170}


def _in_memory(segmenter, image, valid, **kwargs):
    """``segment`` on the whole image as predict prepares it: nodata pixels set to the mean
    (0) before the engine, and nodata again in the labels."""
    x = segmenter.normalize(image)
    x[:, torch.from_numpy(~valid)] = 0
    out = segmenter.segment(x, return_probs=True, **kwargs)
    labels = out.labels.numpy().copy()
    labels[~valid] = NODATA
    return labels, out.probs


@pytest.mark.parametrize("size", [(160, 192), (101, 67), (64, 64), (13, 40), (9, 9), (130, 250)])
@pytest.mark.parametrize("batch", [1, 4])
def test_streamed_predict_equals_segment_on_the_whole_image_bit_for_bit(tmp_path, fitted, size, batch):
    # The invariant that makes predict seamless: the raster read crop by crop at each stage's
    # magnification, the stage maps on disk, equal segment() on the whole image in memory, at
    # fp32, for odd, non-square and smaller-than-a-crop sizes, with a nodata region.
    height, width = size
    image = smooth_image(3, height, width, cell=16, seed=height + width)
    image[:, height // 3 : height // 3 + 4, : width // 2] = 0  # all-zero padding: nodata
    valid = image.any(axis=0)
    segmenter = Segmenter(fitted.config.override([f"engine.batch_size={batch}", "engine.precision=fp32"]),
                          fitted.backbone, fitted.refiner)
    path = write_raster(tmp_path / "scene.tif", image, nodata=0)
    result = predict_raster(segmenter, path, tmp_path / "out", PredictOptions(probs=True))
    labels = read_raster(tmp_path / "out" / "scene.tif")[0][0]
    want_labels, want_probs = _in_memory(segmenter, image, valid)
    np.testing.assert_array_equal(labels, want_labels)
    probs = read_raster(tmp_path / "out" / "scene_probs.tif")[0]
    want = (want_probs.clamp(0, 1) * VALUE_MAX).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(probs[:, valid], want[:, valid])
    sizes = segmenter.config.pyramid.stage_sizes(size)
    assert result.crops == sum(len(crop_boxes(s, (16, 16))) for s in sizes)
    assert not any(p.name.endswith(".partial") for p in (tmp_path / "out").iterdir())


def test_the_fitted_model_segments_a_raster_by_content(tmp_path, fitted):
    image = smooth_image(3, 160, 192, cell=16, seed=5)
    predict_raster(fitted, write_raster(tmp_path / "scene.tif", image), tmp_path / "out")
    labels = read_raster(tmp_path / "out" / "scene.tif")[0][0]
    assert (labels == colour_rule(image)).mean() > 0.85


def test_scratch_bytes_are_the_two_largest_stage_maps_and_the_scratch_is_removed(tmp_path, fitted):
    # 160 x 192 at scales 16/32/64 of a 64 px scene: stages 40x48, 80x96, 160x192; the last
    # writes the outputs, so the scratch holds stages 0 and 1 at once, float32 x 4 classes,
    # in one .npy per 16 px crop (3 x 3 and 5 x 6 of them, 128 bytes of header each).
    path = write_raster(tmp_path / "scene.tif", smooth_image(3, 160, 192, seed=3))
    seen = []
    original = streaming.Scratch.new_map

    def spy(self, stage, size):
        seen.append(self.directory)
        return original(self, stage, size)

    streaming.Scratch.new_map = spy
    try:
        result = predict_raster(fitted, path, tmp_path / "out", PredictOptions(scratch_dir=tmp_path / "scratch"))
    finally:
        streaming.Scratch.new_map = original
    assert map_bytes((40, 48), 4) + map_bytes((80, 96), 4) == 4 * 4 * (40 * 48 + 80 * 96)
    assert result.scratch_bytes == 4 * 4 * (40 * 48 + 80 * 96) + 128 * (9 + 30)
    assert seen and all(d.parent == tmp_path / "scratch" for d in seen)
    assert seen[0].name.startswith(".scene.tif.scratch.") and seen[0].name.endswith(".partial")
    assert not seen[0].exists() and list((tmp_path / "scratch").iterdir()) == []


def test_a_failure_mid_run_removes_the_scratch_and_writes_nothing(tmp_path, fitted, monkeypatch):
    path = write_raster(tmp_path / "scene.tif", smooth_image(3, 100, 120, seed=3))
    calls = 0
    write = streaming.RasterSink.write

    def fail_second(self, *args):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("the backbone fell over")
        return write(self, *args)

    monkeypatch.setattr(streaming.RasterSink, "write", fail_second)
    with pytest.raises(RuntimeError):
        predict_raster(fitted, path, tmp_path / "out")
    assert calls == 2 and list((tmp_path / "out").iterdir()) == []


def test_a_killed_runs_scratch_is_removed_by_the_next_run(tmp_path, fitted):
    path = write_raster(tmp_path / "scene.tif", smooth_image(3, 50, 60, seed=3))
    out = tmp_path / "out"
    out.mkdir()
    dead = partial_path(out / "scene.tif.scratch")
    dead = dead.with_name(dead.name.replace(f".{os.getpid()}@", ".999999999@"))
    (dead / "stage0").mkdir(parents=True)
    (dead / "stage0" / "0.npy").write_bytes(b"left by a SIGKILLed run")
    assert predict_raster(fitted, path, out).status == "ok"
    assert not dead.exists()


def test_too_little_scratch_space_fails_that_input_alone_and_leaves_nothing(tmp_path, fitted, monkeypatch):
    good = write_raster(tmp_path / "a.tif", smooth_image(3, 40, 40, seed=1))
    big = write_raster(tmp_path / "b.tif", smooth_image(3, 200, 200, seed=2))
    # Free space for a 40 px raster's maps (4 * 4 * (10*10 + 20*20) bytes), not a 200 px one's.
    monkeypatch.setattr(streaming, "free_bytes", lambda d: 100_000)
    failed = predict_input(fitted, big, tmp_path / "out")
    assert failed["status"] == "failed"
    assert "scratch space" in failed["error"] and "--scratch-dir" in failed["error"]
    assert "b.tif" in failed["error"]
    assert predict_input(fitted, good, tmp_path / "out")["status"] == "ok"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.qml", "a.tif", "a.tif.aux.xml"]
    with pytest.raises(WriteError):
        predict_raster(fitted, big, tmp_path / "out2")
    assert not (tmp_path / "out2").exists() or list((tmp_path / "out2").iterdir()) == []


def test_a_disk_that_fills_during_the_stages_fails_that_input_cleanly(tmp_path, fitted, monkeypatch):
    # The space check passed, then the disk filled (another process): one clear line naming
    # the input and --scratch-dir, no partial chunk, no scratch, no output.
    import errno

    import numpy as np_module

    path = write_raster(tmp_path / "scene.tif", smooth_image(3, 100, 120, seed=3))
    saves = 0
    real_save = np_module.save

    def full_after_two(f, array):
        nonlocal saves
        saves += 1
        if saves > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(f, array)

    monkeypatch.setattr("magseg.engine.maps.np.save", full_after_two)
    record = predict_input(fitted, path, tmp_path / "out")
    assert record["status"] == "failed" and saves == 3
    assert record["error"].startswith(f"{path}: its stage maps could not be written")
    assert "No space left on device" in record["error"] and "--scratch-dir" in record["error"]
    assert list((tmp_path / "out").iterdir()) == []


def test_the_scale_warning_comes_before_any_stage(tmp_path, fitted, monkeypatch):
    # uint16 pixels for an 8-bit model: the warning is known from the decimated read, so it
    # reaches the caller before the first crop runs.
    image = (smooth_image(3, 80, 90, seed=2).astype(np.uint16) * 257)
    path = write_raster(tmp_path / "u16.tif", image)
    events = []
    result = predict_raster(fitted, path, tmp_path / "out", on_progress=lambda d, t: events.append("crop"),
                            on_warning=lambda m: events.append(m))
    assert len(result.warnings) == 1 and "another scale" in result.warnings[0]
    assert events[0] == result.warnings[0] and events[1:] and set(events[1:]) == {"crop"}


def test_the_scale_check_sees_only_the_pixels_that_are_segmented(tmp_path, fitted):
    """Pixels beyond float32 (1e39 in a float64 raster) are nodata to the stages, but they
    entered the scale check (``band 1 mean 5e+35 ... times training's``)."""
    image = smooth_image(3, 80, 90, seed=2).astype(np.float64)
    image[:, :4, :] = 1e39
    path = write_raster(tmp_path / "f64.tif", image)
    result = predict_raster(fitted, path, tmp_path / "out")
    assert result.warnings == []
    assert result.histogram["nodata"] == 4 * 90
    # The same raster on another scale is still told.
    image[:, 4:, :] *= 1000
    result = predict_raster(fitted, write_raster(tmp_path / "big.tif", image), tmp_path / "out")
    assert len(result.warnings) == 1 and "another scale" in result.warnings[0]
    assert "e+35" not in result.warnings[0] and "e+36" not in result.warnings[0]


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
    path = write_raster(tmp_path / "empty.tif", np.zeros((3, 130, 140), np.uint8), nodata=0)
    monkeypatch.setattr(fitted.backbone, "forward", lambda *a, **k: pytest.fail("engine ran on padding"))
    result = predict_raster(fitted, path, tmp_path / "out", PredictOptions(probs=True))
    assert result.crops == 0 and result.scratch_bytes == 0
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
    assert pp["nodata"] == up["nodata"] == NODATA
    assert probs.max() <= VALUE_MAX and uncert.max() <= VALUE_MAX  # 255 is nodata only
    p = probs.astype(float) / VALUE_MAX
    assert np.abs(p.sum(0) - 1).max() <= 4 / VALUE_MAX             # rounding of 4 values
    top2 = np.sort(p, axis=0)[-2:]
    assert np.abs((1 - (top2[1] - top2[0])) - uncert[0] / VALUE_MAX).max() <= 3 / VALUE_MAX
    sure = (top2[1] - top2[0]) > 3 / VALUE_MAX                     # no tie after rounding
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
        "categories": "/out/a.b.tif.aux.xml", "style": "/out/a.b.qml",
    }

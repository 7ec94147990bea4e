"""Provenance: every output names the checkpoint, config, device and precision that made it,
and a re-run never silently keeps another model's outputs."""

from __future__ import annotations

import hashlib
import json

import magseg.cli.predict  # noqa: F401  (registers the command)
import pyogrio
import rasterio
from conftest import CONFIGS
from geotiff import TRANSFORM, smooth_image, write_raster
from magseg.cli.app import app
from typer.testing import CliRunner

from magseg import __version__
from magseg.config import load_config
from magseg.io.provenance import Provenance, config_sha256
from magseg.io.vector import LAYER


def _predict(*args):
    return CliRunner().invoke(app, ["predict", *map(str, args)])


def _record(result):
    return json.loads(result.stdout.splitlines()[0])


def test_the_config_digest_follows_the_keys_that_decide_the_pixels():
    base = load_config(CONFIGS / "tiny.yaml")
    digest = config_sha256(base)
    for same in ("engine.batch_size=1", "engine.device=cuda", "engine.precision=bf16",
                 "train.epochs=7", "data.root=/elsewhere", "name=renamed"):
        assert config_sha256(base.override([same])) == digest, same
    for other in ("refine.points=0.25", "refine.kernel=5", "pyramid.scales=[32,64]",
                  "data.mean=[1,2,3]", "engine.adaptive.max_crops=2"):
        assert config_sha256(base.override([other])) != digest, other


def test_outputs_carry_what_made_them(tmp_path, fitted_checkpoint):
    path = write_raster(tmp_path / "a.tif", smooth_image(3, 40, 50))
    result = _predict(fitted_checkpoint, path, "-o", tmp_path / "out", "--probs", "--vector", "gpkg")
    assert result.exit_code == 0, result.output
    sha = hashlib.sha256(fitted_checkpoint.read_bytes()).hexdigest()
    config = load_config(CONFIGS / "tiny.yaml", ["pyramid.scales=[16,32,64]", "pyramid.crop=16",
                                                  "pyramid.input=32"])
    for name in ("a.tif", "a_probs.tif"):
        with rasterio.open(tmp_path / "out" / name) as src:
            tags = src.tags()
        assert Provenance.from_tags(tags) == Provenance(__version__, sha, config_sha256(config), "cpu", "fp32")
    metadata = pyogrio.read_info(tmp_path / "out" / "a.gpkg", layer=LAYER)["layer_metadata"]
    assert metadata["MAGSEG_CHECKPOINT_SHA256"] == sha


def test_a_rerun_skips_only_outputs_of_the_same_model(tmp_path, fitted_checkpoint, make_checkpoint):
    path = write_raster(tmp_path / "a.tif", smooth_image(3, 40, 50))
    out = tmp_path / "out"
    assert _record(_predict(fitted_checkpoint, path, "-o", out))["status"] == "ok"
    # The same model (another batch size is not another model): skipped, as always.
    assert _record(_predict(fitted_checkpoint, path, "-o", out, "--batch-size", "1"))["status"] == "skipped"

    other = make_checkpoint(["pyramid.scales=[16,32,64]", "pyramid.crop=16", "pyramid.input=32"])
    for args in ([other], [fitted_checkpoint, "--set", "refine.points=0.25"]):
        before = (out / "a.tif").read_bytes()
        result = _predict(*args[:1], path, "-o", out, *args[1:])
        assert result.exit_code == 1, result.output
        record = _record(result)
        assert record["status"] == "failed" and "made by another model" in record["error"]
        assert "--overwrite" in record["error"] and record["error"].count("checkpoint sha256") == 2
        assert (out / "a.tif").read_bytes() == before

    replaced = _predict(other, path, "-o", out, "--overwrite")
    assert _record(replaced)["status"] == "ok"
    with rasterio.open(out / "a.tif") as src:
        assert src.tags()["MAGSEG_CHECKPOINT_SHA256"] == hashlib.sha256(other.read_bytes()).hexdigest()


def _tif_without_tags(path):
    with rasterio.open(path, "w", driver="GTiff", height=40, width=50, count=1, dtype="uint8",
                       crs="EPSG:32633", transform=rasterio.Affine(1, 0, 0, 0, -1, 40)) as dst:
        dst.write(smooth_image(1, 40, 50))
    return path


def test_a_file_magseg_did_not_write_is_in_the_way_not_finished(tmp_path, fitted_checkpoint):
    """Garbage bytes, or a GeoTIFF without magseg's tags, at an output's name were taken as
    a finished output (skipped, exit 0): only outputs with this run's digests are kept."""
    path = write_raster(tmp_path / "a.tif", smooth_image(3, 40, 50))
    out = tmp_path / "out"
    out.mkdir()
    for name, make in (("a.tif", lambda p: p.write_bytes(b"\x00garbage" * 100)),
                       ("a.tif", _tif_without_tags),
                       ("a_probs.tif", _tif_without_tags),
                       ("a_preview.png", lambda p: p.write_bytes(b"\x89PNG not really"))):
        for stale in out.iterdir():
            stale.unlink()
        if name != "a.tif":  # the class map itself is this model's, its extra is not
            assert _predict(fitted_checkpoint, path, "-o", out).exit_code == 0
        make(out / name)
        before = (out / name).read_bytes()
        result = _predict(fitted_checkpoint, path, "-o", out, "--probs", "--preview")
        assert result.exit_code == 1, (name, result.output)
        record = _record(result)
        assert record["status"] == "failed" and record["error"].startswith(f"{out / name} is in the way")
        assert "--overwrite" in record["error"]
        assert (out / name).read_bytes() == before
        replaced = _predict(fitted_checkpoint, path, "-o", out, "--probs", "--preview", "--overwrite")
        assert _record(replaced)["status"] == "ok"
        assert _record(_predict(fitted_checkpoint, path, "-o", out, "--probs", "--preview"))["status"] == "skipped"


def test_overwrite_with_another_model_removes_the_old_models_extras(tmp_path, fitted_checkpoint,
                                                                    make_checkpoint):
    """--overwrite with another checkpoint replaced the class map but left the old model's
    _uncertainty.tif and _preview.png beside it: they are removed, and the record says so.
    Without --overwrite, a new class map is not written beside them."""
    path = write_raster(tmp_path / "a.tif", smooth_image(3, 40, 50))
    out = tmp_path / "out"
    assert _predict(fitted_checkpoint, path, "-o", out, "--uncertainty", "--preview", "--vector",
                    "gpkg").exit_code == 0
    other = make_checkpoint(["pyramid.scales=[16,32,64]", "pyramid.crop=16", "pyramid.input=32"])

    (out / "a.tif").unlink()  # a new class map, the old model's extras still there
    refused = _predict(other, path, "-o", out)
    assert refused.exit_code == 1 and "would stay beside this run's outputs" in _record(refused)["error"]
    assert not (out / "a.tif").exists()

    result = _predict(other, path, "-o", out, "--overwrite")
    assert result.exit_code == 0, result.output
    record = _record(result)
    stale = [out / "a_uncertainty.tif", out / "a_preview.png", out / "a.gpkg"]
    assert sorted(record["removed"]) == sorted(map(str, stale))
    assert sorted(p.name for p in out.iterdir()) == ["a.qml", "a.tif", "a.tif.aux.xml"]
    # The same model's extras are kept by a later --overwrite that does not ask for them.
    assert _predict(other, path, "-o", out, "--probs").exit_code == 0
    assert _record(_predict(other, path, "-o", out, "--overwrite"))["removed"] == []
    assert (out / "a_probs.tif").exists()


def test_other_polygon_options_remake_the_layer_from_the_class_map(tmp_path, fitted_checkpoint):
    """Changing only --min-area or --simplify on a finished input reported skipped: the layer
    is made again from the class map on disk, nothing segmented again."""
    path = write_raster(tmp_path / "a.tif", smooth_image(3, 40, 50))
    out = tmp_path / "out"
    assert _predict(fitted_checkpoint, path, "-o", out, "--vector", "gpkg").exit_code == 0
    labels = (out / "a.tif").read_bytes()
    full = pyogrio.read_info(out / "a.gpkg", layer=LAYER)["features"]
    again = _record(_predict(fitted_checkpoint, path, "-o", out, "--vector", "gpkg", "--min-area", "1e9"))
    assert again["status"] == "ok" and again["windows"] == 0 and again["crops"] == 0
    assert pyogrio.read_info(out / "a.gpkg", layer=LAYER)["features"] == 0 < full
    assert (out / "a.tif").read_bytes() == labels
    same = _predict(fitted_checkpoint, path, "-o", out, "--vector", "gpkg", "--min-area", "1e9")
    assert _record(same)["status"] == "skipped"


def test_a_rerun_that_reads_the_input_otherwise_keeps_nothing_silently(tmp_path, fitted_checkpoint):
    # The same model reading other bands, another --nodata or only an area makes other
    # pixels: the outputs of the first run are not this run's, and a re-run says so.
    path = write_raster(tmp_path / "a.tif", smooth_image(3, 40, 50))
    out = tmp_path / "out"
    assert _record(_predict(fitted_checkpoint, path, "-o", out, "--uncertainty"))["status"] == "ok"
    with rasterio.open(out / "a.tif") as src:
        tag = json.loads(src.tags()["MAGSEG_READ_OPTIONS"])
    assert tag == {"bands": None, "nodata": None, "area": None}
    (x0, y0), (x1, y1) = TRANSFORM @ (5, 5), TRANSFORM @ (30, 25)
    before = (out / "a.tif").read_bytes()
    for args, words in ((["--nodata", "0"], "--nodata 0"), (["--bands", "3,2,1"], "bands [3, 2, 1]"),
                        (["--bbox", f"{x0},{y1},{x1},{y0}"], "the area of --bbox")):
        result = _predict(fitted_checkpoint, path, "-o", out, *args)
        assert result.exit_code == 1, (args, result.output)
        error = _record(result)["error"]
        assert error.startswith(f"{out / 'a.tif'} was made from another reading of the input"), error
        assert "the whole raster" in error and words in error and "--overwrite" in error
        assert (out / "a.tif").read_bytes() == before
    # The class map of the first run would stay beside this one's: refused too.
    (out / "a.tif").unlink()
    result = _predict(fitted_checkpoint, path, "-o", out, "--nodata", "0")
    assert result.exit_code == 1 and "a_uncertainty.tif was made from another reading" in _record(result)["error"]
    # --overwrite replaces them and records the new reading; the same reading is skipped.
    assert _record(_predict(fitted_checkpoint, path, "-o", out, "--nodata", "0", "--overwrite"))["status"] == "ok"
    with rasterio.open(out / "a.tif") as src:
        assert json.loads(src.tags()["MAGSEG_READ_OPTIONS"])["nodata"] == 0
    assert not (out / "a_uncertainty.tif").exists()  # not asked for now, and not this run's
    assert _record(_predict(fitted_checkpoint, path, "-o", out, "--nodata", "0"))["status"] == "skipped"


def _bands_1_2_3_read_as_the_default(checkpoint, path, out, *settings):
    """``--bands 1,2,3`` on ``path`` (``a.tif``) records no bands, and re-runs without it
    and with it keep the outputs."""
    assert _record(_predict(checkpoint, path, "-o", out, *settings, "--bands", "1,2,3"))["status"] == "ok"
    with rasterio.open(out / "a.tif") as src:
        assert json.loads(src.tags()["MAGSEG_READ_OPTIONS"])["bands"] is None
    assert _record(_predict(checkpoint, path, "-o", out, *settings))["status"] == "skipped"
    assert _record(_predict(checkpoint, path, "-o", out, *settings, "--bands", "1,2,3"))["status"] == "skipped"


def test_bands_named_as_the_checkpoints_own_are_the_default_reading(tmp_path, fitted_checkpoint):
    # --bands listing the model's data.bands in their order reads the same pixels as no
    # --bands: its outputs record the default reading, and a re-run either way keeps them.
    path = write_raster(tmp_path / "a.tif", smooth_image(3, 40, 50))
    out = tmp_path / "out"
    stored = ["--set", "data.bands=[1,2,3]"]
    _bands_1_2_3_read_as_the_default(fitted_checkpoint, path, out, *stored)
    # Another order is another reading.
    result = _predict(fitted_checkpoint, path, "-o", out, *stored, "--bands", "3,2,1")
    assert result.exit_code == 1 and "another reading of the input" in _record(result)["error"]


def test_bands_naming_every_band_of_the_raster_in_order_are_the_default_reading(tmp_path, fitted_checkpoint):
    # Without data.bands in the checkpoint, the default reading is every band of the raster
    # in order: --bands 1,2,3 of a 3-band raster reads the same pixels, and records none.
    path = write_raster(tmp_path / "a.tif", smooth_image(3, 40, 50))
    out = tmp_path / "out"
    unset = ["--set", "data.bands=null"]  # the test checkpoint's config names bands 1,2,3
    _bands_1_2_3_read_as_the_default(fitted_checkpoint, path, out, *unset)
    # Of a 4-band raster, bands 1,2,3 are a choice (without --bands it cannot be read): recorded.
    four = write_raster(tmp_path / "b.tif", smooth_image(4, 40, 50))
    assert _record(_predict(fitted_checkpoint, four, "-o", out, *unset, "--bands", "1,2,3"))["status"] == "ok"
    with rasterio.open(out / "b.tif") as src:
        assert json.loads(src.tags()["MAGSEG_READ_OPTIONS"])["bands"] == [1, 2, 3]
    assert _record(_predict(fitted_checkpoint, four, "-o", out, *unset, "--bands", "1,2,3"))["status"] == "skipped"
    result = _predict(fitted_checkpoint, four, "-o", out, *unset, "--bands", "2,3,4")
    assert result.exit_code == 1 and "another reading of the input" in _record(result)["error"]


def test_an_output_from_before_the_reading_was_recorded_reads_as_the_defaults(tmp_path, fitted_checkpoint):
    path = write_raster(tmp_path / "a.tif", smooth_image(3, 40, 50))
    out = tmp_path / "out"
    assert _record(_predict(fitted_checkpoint, path, "-o", out))["status"] == "ok"
    with rasterio.open(out / "a.tif", "r+") as dst:  # as an older magseg wrote it (GDAL
        dst.update_tags(MAGSEG_READ_OPTIONS="")     # cannot drop a tag; an empty one is none)
    assert _record(_predict(fitted_checkpoint, path, "-o", out))["status"] == "skipped"
    assert _predict(fitted_checkpoint, path, "-o", out, "--nodata", "0").exit_code == 1


def test_a_reading_tag_magseg_did_not_write_is_named_not_a_traceback():
    from magseg.run.options import PredictOptions, describe_read, read_options_tag

    assert describe_read(read_options_tag(PredictOptions(nodata=0.0))) == \
        "bands default, --nodata 0.0, the whole raster"
    for garbage in ("not json", "[1, 2]", '{"bands": null}'):
        assert describe_read(garbage) == f"unknown: {garbage!r}"

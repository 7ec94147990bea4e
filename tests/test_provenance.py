"""Provenance: every output names the checkpoint, config, device and precision that made it,
and a re-run never silently keeps another model's outputs."""

from __future__ import annotations

import hashlib
import json

import magseg.cli.predict  # noqa: F401  (registers the command)
import pyogrio
import rasterio
from conftest import CONFIGS
from geotiff import smooth_image, write_raster
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

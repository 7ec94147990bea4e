"""The seam score in predict's record: the finest stage's crop borders on the class map and
the uncertainty raster as written, equal to the score of the files read back whole."""

from __future__ import annotations

import json

import magseg.cli.predict  # noqa: F401  (registers the command)
import numpy as np
import pytest
from geotiff import read_raster, smooth_image, write_raster
from magseg.cli.app import app
from typer.testing import CliRunner

from magseg.checkpoint import load_checkpoint
from magseg.evaluation.seams import SeamTally, crop_border_lines, line_changes, line_period
from magseg.io.raster import NODATA
from magseg.run.seam_record import finest_seam_scores

SMALL_SCENE = ["pyramid.scales=[16,32,64]", "pyramid.crop=16", "pyramid.input=32"]


def test_predict_records_the_finest_stages_seam_score(tmp_path, make_checkpoint):
    ckpt = make_checkpoint(SMALL_SCENE)
    image = smooth_image(3, 150, 170, seed=1)
    image[:, :, :5] = 0  # padding -> nodata
    path = write_raster(tmp_path / "a.tif", image)
    result = CliRunner().invoke(app, ["predict", str(ckpt), str(path), "--out-dir", str(tmp_path / "out"),
                                      "--uncertainty"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.splitlines()[0])
    seam = record["seam_score"]
    pyramid = load_checkpoint(ckpt).config.pyramid
    stage = pyramid.stage_sizes((150, 170))[-1]
    assert seam["stage"] == list(stage)
    labels, _ = read_raster(record["output"])
    uncertainty, _ = read_raster(record["outputs"]["uncertainty"])
    rows, cols = crop_border_lines(stage, pyramid.crop, (150, 170))
    assert rows and cols
    for key, changes in (("labels", line_changes(labels[0], ignore=NODATA)),
                         ("uncertainty", line_changes(uncertainty[0] / 255, continuous=True,
                                                      invalid=labels[0] == NODATA))):
        tally = SeamTally()
        tally.add(changes, rows, cols, line_period(pyramid.scales, (150, 170), pyramid.scene))
        assert seam[key] == pytest.approx(tally.score(), abs=1e-4), key
    # Read back in strips of any height: the same.
    again = finest_seam_scores(record["output"], record["outputs"]["uncertainty"], (150, 170), pyramid, strip=7)
    assert again == seam


def test_a_clips_seam_score_uses_the_whole_rasters_grid(tmp_path, make_checkpoint):
    import rasterio

    ckpt = make_checkpoint(SMALL_SCENE)
    pyramid = load_checkpoint(ckpt).config.pyramid
    assert pyramid.stage_sizes((64, 64))[-1] == (32, 32)  # tiny.yaml's scene is 128: crops of 16
    labels = np.random.default_rng(0).integers(0, 3, (40, 50)).astype(np.uint8)
    path = tmp_path / "clip.tif"
    with rasterio.open(path, "w", driver="GTiff", height=40, width=50, count=1, dtype="uint8") as dst:
        dst.write(labels, 1)
    # A 40 x 50 clip at (10, 7) of a 64 x 64 raster: the finest grid's border at stage pixel
    # 16 is image pixel 32, clip row 22 and column 25.
    got = finest_seam_scores(path, None, (40, 50), pyramid, whole=((64, 64), (10, 7)))
    tally = SeamTally()
    tally.add(line_changes(labels), [22], [25], line_period(pyramid.scales, (64, 64), pyramid.scene))
    assert got["stage"] == [32, 32] and got["labels"] == pytest.approx(tally.score(), abs=1e-4)

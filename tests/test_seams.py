"""The seam score (magseg.evaluation.seams): hand-computed numbers on small maps, and
properties of maps with a crop grid painted in and of maps without one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from magseg.engine.pyramid import crop_boxes
from magseg.evaluation.seams import (
    SeamTally,
    crop_border_lines,
    line_changes,
    pyramid_border_lines,
    seam_score,
    stage_seam_scores,
)


def blobs(size: tuple[int, int], seed: int, classes: int = 4, cell: int = 24) -> np.ndarray:
    """A class map of smooth random regions (no grid): the argmax of random fields
    upsampled bilinearly from a coarse grid of ``cell``-pixel spacing, offset at random."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    coarse = torch.rand((1, classes, h // cell + 3, w // cell + 3), generator=g)
    big = torch.nn.functional.interpolate(coarse, scale_factor=cell, mode="bilinear", align_corners=False)
    dy, dx = (int(v) for v in torch.randint(0, cell, (2,), generator=g))
    return big[0, :, dy:dy + h, dx:dx + w].argmax(0).numpy().astype(np.uint8)


def test_line_changes_and_score_by_hand():
    # Columns 0-1 are class 0, columns 2-3 class 1, except one pixel: the only vertical
    # changes are on the line before column 2 (4 of 4 rows), and the pixel (0, 3) = 0
    # adds one change before column 3 and one below it.
    m = np.array([[0, 0, 1, 0],
                  [0, 0, 1, 1],
                  [0, 0, 1, 1],
                  [0, 0, 1, 1]], np.uint8)
    c = line_changes(m)
    assert c.cols.tolist() == [0, 0, 4, 1] and c.col_pairs.tolist() == [0, 4, 4, 4]
    assert c.rows.tolist() == [0, 1, 0, 0] and c.row_pairs.tolist() == [0, 4, 4, 4]
    # Line rates: rows 1/4, 0, 0; cols 0, 1, 1/4 -> median 1/8 (of 0, 0, 0, 1/4, 1/4, 1).
    assert seam_score(m, [], [2]) == pytest.approx(1.0 / 0.125)
    assert seam_score(m, [2], []) == 0.0
    assert seam_score(m, [], []) is None


def test_ignore_drops_pairs_and_continuous_uses_differences():
    m = np.array([[0, 255], [0, 1]], np.uint8)
    c = line_changes(m, ignore=255)
    assert c.col_pairs.tolist() == [0, 1] and c.cols.tolist() == [0, 1]
    assert c.row_pairs.tolist() == [0, 1] and c.rows.tolist() == [0, 0]
    u = line_changes(np.array([[0.0, 0.5], [0.25, 0.5]]), continuous=True)
    assert u.cols.tolist() == [0, 0.75] and u.rows.tolist() == [0, 0.25]


def test_a_map_that_never_changes_scores_one():
    assert seam_score(np.zeros((8, 8), np.uint8), [4], [4]) == 1.0


def test_border_lines_follow_the_crop_grid_and_scale_to_the_map():
    assert crop_border_lines((512, 512), (128, 128)) == ([128, 256, 384], [128, 256, 384])
    assert crop_border_lines((128, 128), (128, 128)) == ([], [])
    # Stage 256 in crops of 128, seen on a map of 512: the border at 128 is at 256.
    assert crop_border_lines((256, 256), (128, 128), (512, 512)) == ([256], [256])
    # 300 in crops of 128: crops at 0, 128, 172; the overlap [172, 256) split at 214.
    assert crop_border_lines((300, 200), (128, 128)) == ([128, 214], [100])
    lines = pyramid_border_lines([(128, 128), (256, 256), (512, 512)], (128, 128), (512, 512))
    assert lines == [([], []), ([256], [256]), ([128, 256, 384], [128, 256, 384])]


@pytest.mark.parametrize("seed", range(4))
def test_maps_without_a_grid_score_near_one(seed):
    rng = np.random.default_rng(seed)
    size = (int(rng.integers(200, 400)), int(rng.integers(200, 400)))
    crop = int(rng.integers(40, 100))
    m = blobs(size, seed)
    rows, cols = crop_border_lines(size, (crop, crop))
    assert 0.5 < seam_score(m, rows, cols) < 1.6


@pytest.mark.parametrize("seed", range(4))
def test_a_painted_grid_scores_high_on_its_lines_only(seed):
    rng = np.random.default_rng(seed)
    size, crop = (384, 384), int(rng.choice([64, 96, 128]))
    # Every crop of the grid cut from another map: labels jump at every crop border.
    m = np.zeros(size, np.uint8)
    for i, box in enumerate(crop_boxes(size, (crop, crop))):
        m[box.owned.slices] = blobs(size, 100 * seed + i)[box.owned.slices]
    rows, cols = crop_border_lines(size, (crop, crop))
    assert seam_score(m, rows, cols) > 3
    # The same map across lines halfway between the borders: no seam there.
    half = [r - crop // 2 for r in rows] + [rows[-1] + crop // 2]
    assert 0.4 < seam_score(m, half, half) < 1.6


def test_tally_sums_over_maps_and_stage_scores():
    a, b = blobs((256, 256), 1), blobs((256, 256), 2)
    rows, cols = crop_border_lines((256, 256), (64, 64))
    t = SeamTally()
    t.add(line_changes(a), rows, cols)
    t.add(line_changes(b), rows, cols)
    border = sum(line_changes(x).rows[rows].sum() + line_changes(x).cols[cols].sum() for x in (a, b))
    assert t.border_changes == border and t.border_pairs == 2 * 2 * 3 * 256
    scores = stage_seam_scores(a, [(64, 64), (128, 128), (256, 256)], (64, 64))
    assert scores[0] is None
    assert scores[2] == pytest.approx(seam_score(a, rows, cols))


def test_benchmark_reports_the_seam_score_of_every_method_per_stage(make_checkpoint, tmp_path):
    import dataclasses
    import json

    from magseg.cli.app import _register, app
    from typer.testing import CliRunner

    from magseg.data.scenes import list_scenes, read_scene
    from magseg.data.synthetic import DEEPGLOBE_CLASSES, SceneSpec, write_dataset
    from magseg.segmenter import Segmenter

    _register()
    ckpt = make_checkpoint({"classes": [dataclasses.asdict(c) for c in DEEPGLOBE_CLASSES]}, name="dg.ckpt")
    data = tmp_path / "data"
    write_dataset(data, {"train": 1, "test": 2}, SceneSpec(size=(128, 128)), seed=4)
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["benchmark", str(ckpt), str(data), "--out-dir", str(out),
                                      "--samples", "0", "--no-warmup"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    seg = Segmenter.from_checkpoint(ckpt)
    p = seg.config.pyramid
    # By hand: the progressive labels of both scenes, pooled, on each stage's grid.
    tallies = [SeamTally() for _ in p.scales]
    for scene in list_scenes(seg.config.data, "test", data):
        image, _ = read_scene(scene, seg.config)
        labels = seg.segment(image, normalized=False).labels.numpy()
        for tally, (rows, cols) in zip(tallies, pyramid_border_lines(p.scales, p.crop, labels.shape)):
            tally.add(line_changes(labels), rows, cols)
    for name, m in report["methods"].items():
        assert len(m["seam_scores"]) == len(p.scales), name
    expected = [t.score() for t in tallies]
    assert report["methods"]["progressive"]["seam_scores"] == pytest.approx(expected)
    assert expected[0] is None and expected[-1] is not None  # stage 0 is one crop of 32
    assert "## Seams" in (out / "report.md").read_text()
    assert report["config"]["pyramid"]["margin"] == 0 and report["config"]["refine"]["border"] == 0


def test_seam_score_script_on_a_geotiff(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    import rasterio

    size, crop = (256, 256), 64
    m = np.zeros(size, np.uint8)
    for i, box in enumerate(crop_boxes(size, (crop, crop))):
        m[box.owned.slices] = blobs(size, i)[box.owned.slices]
    path = tmp_path / "map.tif"
    with rasterio.open(path, "w", driver="GTiff", height=256, width=256, count=1, dtype="uint8") as dst:
        dst.write(m, 1)
    script = Path(__file__).resolve().parents[1] / "scripts" / "seam_score.py"
    done = subprocess.run([sys.executable, str(script), str(path), "--scales", "128,256", "--crop", str(crop)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    # Stage 128 (2 x 2 crops of 64) has its border at 128 on this map, one of the painted
    # ones; stage 256 has the painted grid itself.
    rows, cols = crop_border_lines((256, 256), (64, 64))
    assert [s["size"] for s in out["stages"]] == [[128, 128], [256, 256]]
    assert out["stages"][1]["seam_score"] == pytest.approx(seam_score(m, rows, cols), abs=1e-4)
    assert out["stages"][0]["seam_score"] == pytest.approx(seam_score(m, [128], [128]), abs=1e-4)
    bad = subprocess.run([sys.executable, str(script), str(tmp_path / "missing.tif"), "--scales", "8",
                          "--crop", "4"], capture_output=True, text=True)
    assert bad.returncode == 1 and "missing.tif" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("strip", [1, 7, 50, 300])
def test_changes_read_in_strips_equal_the_whole_maps(strip):
    from magseg.evaluation.seams import StripChanges

    m = blobs((123, 77), 5)
    m[3:9, 10:20] = 255
    invalid = np.zeros(m.shape, bool)
    invalid[60:70, 0:5] = True
    whole = line_changes(m, ignore=255, invalid=invalid)
    parts = StripChanges(77, ignore=255)
    for top in range(0, 123, strip):
        parts.add(m[top:top + strip], invalid[top:top + strip])
    got = parts.changes()
    for name in ("rows", "row_pairs", "cols", "col_pairs"):
        np.testing.assert_array_equal(getattr(got, name), getattr(whole, name))
    assert len(whole.rows) == 123 and len(whole.cols) == 77

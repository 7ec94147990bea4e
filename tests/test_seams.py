"""The seam score (magseg.evaluation.seams): hand-computed numbers on small maps, and
properties of maps with a crop grid painted in and of maps without one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from magseg.engine.pyramid import crop_boxes
from magseg.evaluation.seams import (
    SeamTally,
    control_lines,
    crop_border_lines,
    line_changes,
    line_period,
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
    # Border: the line before column 2, 4 changes in 4 pairs. Controls (period 1): the lines
    # before columns 1 and 3, 0 + 1 changes in 8 pairs -> 1 / (1/8).
    assert seam_score(m, [], [2]) == pytest.approx(1.0 / 0.125)
    # Row line 2 never changes; its controls (row lines 1, 3) change once: 0.
    assert seam_score(m, [2], []) == 0.0
    # Period 2: the only control of column line 2 would be line 0, which is no line, so the
    # score is undefined; with period 3 nothing shares its residue either.
    assert seam_score(m, [], [2], period=(1, 2)) is None
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


def test_control_lines_share_a_borders_phase_and_the_period_is_the_first_stages():
    assert control_lines([4, 8], 13, 4) == [12]
    assert control_lines([5], 12, 4) == [1, 9]
    assert control_lines([2], 6, 1) == [1, 3, 4, 5]
    assert control_lines([], 10, 2) == []
    assert line_period([(128, 128), (256, 256), (512, 512)], (512, 512)) == (4, 4)
    # A 2448 x 1224 image with DeepGlobe's scales: stage sizes scale per axis, period 4.
    assert line_period([(612, 612), (1224, 1224), (2448, 2448)], (2448, 1224)) == (4, 4)
    assert line_period([(64, 64)], (64, 64)) == (1, 1)


@pytest.mark.parametrize("seed", range(3))
def test_enlarged_maps_without_crops_score_near_one(seed):
    # What downsample-only makes: maps at 1/4 of the size, enlarged; no crop grid. Pooled
    # over 16 maps (as a benchmark split is), as its 6 border lines of a map alone are few.
    g = torch.Generator().manual_seed(seed)
    rows, cols = crop_border_lines((512, 512), (128, 128))
    period = line_period([(128, 128), (256, 256), (512, 512)], (512, 512))
    tally = SeamTally()
    for _ in range(16):
        coarse = torch.rand((1, 5, 37, 37), generator=g)  # nodes off the grid of 128
        small = torch.nn.functional.interpolate(coarse, size=(128, 128), mode="bilinear", align_corners=False)
        big = torch.nn.functional.interpolate(small, scale_factor=4, mode="bilinear", align_corners=False)
        tally.add(line_changes(big[0].argmax(0).numpy().astype(np.uint8)), rows, cols, period)
    assert 0.75 < tally.score() < 1.3


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
    # Period 1: every other line of each axis is a control, 2 maps x 2 axes x 252 lines.
    assert t.control_pairs == 2 * 2 * (255 - 3) * 256
    scores = stage_seam_scores(a, [(64, 64), (128, 128), (256, 256)], (64, 64))
    assert scores[0] is None
    assert scores[2] == pytest.approx(seam_score(a, rows, cols, period=(4, 4)))


def test_benchmark_reports_the_seam_score_of_every_method_per_stage(make_checkpoint, tmp_path):
    import json

    from magseg.cli.app import _register, app
    from typer.testing import CliRunner

    from magseg.data.scenes import list_scenes, read_scene
    from synthetic import DEEPGLOBE_CLASSES_OVERRIDE, SceneSpec, write_dataset
    from magseg.segmenter import Segmenter

    _register()
    ckpt = make_checkpoint(DEEPGLOBE_CLASSES_OVERRIDE, name="dg.ckpt")
    data = tmp_path / "data"
    write_dataset(data, {"train": 1, "test": 2}, SceneSpec(size=(128, 128)), seed=4)
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["benchmark", str(ckpt), "--data-root", str(data), "--out-dir", str(out),
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
        period = line_period(p.scales, labels.shape)
        for tally, (rows, cols) in zip(tallies, pyramid_border_lines(p.scales, p.crop, labels.shape)):
            tally.add(line_changes(labels), rows, cols, period)
    for name, m in report["methods"].items():
        assert len(m["seam_scores"]) == len(p.scales), name
    expected = [t.score() for t in tallies]
    assert report["methods"]["progressive"]["seam_scores"] == pytest.approx(expected)
    assert expected[0] is None and expected[-1] is not None  # stage 0 is one crop of 32
    assert "## Seams" in (out / "report.md").read_text()
    # The config the benchmark ran: the default margin (1/8 of the crop), no border term.
    assert report["config"]["pyramid"]["margin"] == 0.125 and report["config"]["refine"]["border"] == 0
    assert report["config"]["pyramid"]["margin_pixels"] == [4, 4]


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
    # The map is stage 128 enlarged twice over: control lines share a border's phase mod 2.
    period = (2, 2)
    assert out["stages"][1]["seam_score"] == pytest.approx(seam_score(m, rows, cols, period=period), abs=1e-4)
    assert out["stages"][0]["seam_score"] == pytest.approx(seam_score(m, [128], [128], period=period), abs=1e-4)
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


def test_bench_margins_runs_each_checkpoints_settings_interleaved(make_checkpoint, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from magseg.data.scenes import list_scenes, read_scene
    from synthetic import DEEPGLOBE_CLASSES_OVERRIDE, SceneSpec, write_dataset
    from magseg.evaluation.metrics import ConfusionMatrix
    from magseg.segmenter import Segmenter

    classes = DEEPGLOBE_CLASSES_OVERRIDE
    a = make_checkpoint(classes, name="a.ckpt")
    b = make_checkpoint({**classes, "pyramid": {"scales": [32, 64, 128], "crop": 32, "input": 32, "margin": 8}},
                        name="b.ckpt")
    data = tmp_path / "data"
    write_dataset(data, {"train": 1, "test": 2}, SceneSpec(size=(128, 128)), seed=5)
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_margins.py"
    done = subprocess.run([sys.executable, str(script), f"{a}@0:0", f"{b}@8:4,8:0", str(data), "--threads", "1"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    rows = {(Path(r["checkpoint"]).name, r["margin"], r["border"], r["method"]): r for r in out["rows"]}
    assert set(rows) == {(n, m, bd, meth) for n, m, bd in (("a.ckpt", 0, 0), ("b.ckpt", 8, 4), ("b.ckpt", 8, 0))
                         for meth in ("progressive", "patch")}
    # Backbone pixels per image pixel by hand: stages of 32, 64, 128 in crops of 32 are
    # 1 + 4 + 16 crops; with 8 px margins a window is 48 where the stage is larger than a crop.
    assert rows[("a.ckpt", 0, 0, "progressive")]["backbone_pixels_per_pixel"] == round(21 * 32**2 / 128**2, 3)
    assert rows[("b.ckpt", 8, 0, "progressive")]["backbone_pixels_per_pixel"] == round(
        (32**2 + 20 * 48**2) / 128**2, 3)
    assert rows[("b.ckpt", 8, 0, "patch")]["backbone_pixels_per_pixel"] == round(16 * 48**2 / 128**2, 3)
    # Patch-only has no refinement: one run per checkpoint and margin, the border aside.
    assert rows[("b.ckpt", 8, 4, "patch")] == {**rows[("b.ckpt", 8, 0, "patch")], "border": 4}
    assert rows[("a.ckpt", 0, 0, "progressive")]["time_ratio"] == 1.0
    # Without a border term the band's edges are the crop borders themselves.
    for key in (("a.ckpt", 0, 0, "progressive"), ("b.ckpt", 8, 0, "progressive"), ("b.ckpt", 8, 4, "patch")):
        assert rows[key]["band_edge_seam_scores"] == rows[key]["seam_scores"]
    # mIoU of a's progressive method by hand (at its setting, margin 0): one confusion matrix
    # over the split.
    seg = Segmenter.from_checkpoint(a, ["engine.precision=fp32", "pyramid.margin=0"])
    matrix = ConfusionMatrix(seg.config.num_classes, [c.in_mean for c in seg.config.classes])
    for scene in list_scenes(seg.config.data, "test", data):
        image, mask = read_scene(scene, seg.config)
        matrix.update(seg.segment(image, normalized=False).labels, torch.from_numpy(mask))
    assert rows[("a.ckpt", 0, 0, "progressive")]["miou"] == round(100 * float(matrix.scores()["miou"]), 2)
    assert rows[("a.ckpt", 0, 0, "progressive")]["uncertainty_seam_scores"] is None
    # --uncertainty: the uncertainty map's score too, per stage (none for stage 0, one crop),
    # and the labels' figures unchanged.
    done = subprocess.run([sys.executable, str(script), f"{a}@0:0", str(data), "--threads", "1", "--no-patch",
                           "--uncertainty"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    [row] = json.loads(done.stdout)["rows"]
    assert row["uncertainty_seam_scores"][0] is None and all(v > 0 for v in row["uncertainty_seam_scores"][1:])
    assert row["miou"] == rows[("a.ckpt", 0, 0, "progressive")]["miou"]

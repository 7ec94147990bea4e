"""``magseg benchmark`` on tiny runs: every field of the report, scores that agree with the
engine run by hand, and clear errors (naming files) for bad inputs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from magseg.cli.app import _register, app
from typer.testing import CliRunner

from magseg.config import AdaptiveConfig, RefineConfig
from magseg.data.scenes import list_scenes, read_scene
from synthetic import DEEPGLOBE_CLASSES, DEEPGLOBE_CLASSES_OVERRIDE, SceneSpec, write_dataset
from magseg.evaluation.benchmark import (
    BASELINES,
    NO_REFINER,
    PATCH_CRF,
    PROGRESSIVE_CRF,
    FailedScene,
    benchmark_methods,
)
from magseg.evaluation.boundary import BoundaryTally
from magseg.evaluation.metrics import ConfusionMatrix
from magseg.run.benchmark import run_benchmark, score_scene
from magseg.run.pools import Pool
from magseg.segmenter import Segmenter

_register()
NAMES = [c.name for c in DEEPGLOBE_CLASSES]
METHOD_FIELDS = {"miou", "iou", "accuracy", "fwiou", "seconds_per_image", "peak_memory_mb",
                 "peak_memory_increase_mb", "confusion_matrix", "description",
                 "boundary_miou", "boundary_iou", "boundary_mf", "boundary_f", "boundary_counts"}


@pytest.fixture
def data(tmp_path) -> Path:
    """2 test scenes of 128 x 128 (the tiny config's finest scale), DeepGlobe layout."""
    root = tmp_path / "data"
    write_dataset(root, {"train": 1, "test": 2}, SceneSpec(size=(128, 128)), seed=4)
    return root


@pytest.fixture
def ckpt(make_checkpoint) -> Path:
    """Tiny model (tiny.yaml's 32 -> 64 -> 128 pyramid) with DeepGlobe's 7 classes."""
    return make_checkpoint(DEEPGLOBE_CLASSES_OVERRIDE, name="dg.ckpt")


def run(*args: str, warmup: bool = False):
    # Warm-up runs only make timings fair; these tests check scores and files.
    extra = [] if warmup else ["--no-warmup"]
    result = CliRunner().invoke(app, ["benchmark", *map(str, args), *extra])
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result, lines


def test_report_has_every_field(ckpt, data, tmp_path):
    out = tmp_path / "bench"
    result, lines = run(ckpt, "--data-root", data, "--out-dir", out, "--adaptive-max-crops", "2", "--samples", "2",
                        warmup=True)
    assert result.exit_code == 0, result.output
    # NDJSON: one line per image, then one summary line.
    assert [line.get("id") for line in lines[:-1]] == ["000001", "000002"]
    for line in lines[:-1]:
        assert set(line["methods"]) == {"progressive", NO_REFINER, "downsample", "patch", "adaptive"}
        assert {"miou", "seconds"} <= set(line["methods"]["patch"])
    summary = lines[-1]
    assert summary["summary"] is True and summary["images"] == 2 and summary["failed"] == []

    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 2 and report["complete"] and report["split"] == "test"
    assert [c["name"] for c in report["classes"]] == NAMES
    assert set(report["methods"]) == {"progressive", NO_REFINER, "downsample", "patch", "adaptive"}
    for name, m in report["methods"].items():
        assert METHOD_FIELDS <= set(m), name
        assert list(m["iou"]) == NAMES
        assert 0 <= m["miou"] <= 1 and 0 <= m["accuracy"] <= 1
        assert m["seconds_per_image"] > 0 and m["peak_memory_mb"] > 50
        assert summary["methods"][name]["miou"] == m["miou"]
    stages = report["methods"]["progressive"]["stages"]
    assert [s["size"] for s in stages] == [[32, 32], [64, 64], [128, 128]]
    assert stages[0]["refined_fraction"] == 0
    # K = 0.5 of every crop's pixels at every later stage (tiny.yaml).
    assert [s["refined_fraction"] for s in stages[1:]] == [0.5, 0.5]
    assert all(s["crops_run"] == s["crops_total"] for s in stages)
    adaptive = report["methods"]["adaptive"]["stages"]
    assert [s["crops_run"] for s in adaptive[1:]] == [2 * 2, 2 * 2]  # 2 per stage, 2 images
    assert set(report["margins_miou_points"]) == {"progressive_minus_downsample", "progressive_minus_patch"}
    assert {"time", "memory", "miou"} <= set(report["measurement"])
    assert report["config"]["pyramid"]["scales"] == [[32, 32], [64, 64], [128, 128]]

    assert report["plots"] == ["per_class_iou.png", "confusion_matrix.png", "per_class_boundary_iou.png",
                               "miou_per_stage.png", "reliability.png",
                               "samples/000001.png", "samples/000002.png"]
    for plot in report["plots"]:
        image = cv2.imread(str(out / plot))
        assert image is not None and min(image.shape[:2]) > 100, plot
    md = (out / "report.md").read_text()
    best = max(m["miou"] for m in report["methods"].values())
    for name, m in report["methods"].items():
        miou = f"{100 * m['miou']:.1f}"
        # Only the best mIoU is bold (ties as shown all are).
        bold = miou == f"{100 * best:.1f}"
        assert any(line.startswith(f"| {name} ") and f" | {'**' + miou + '**' if bold else miou} |" in line
                   for line in md.splitlines()), name
        assert set(m["producer_accuracy"]) == set(m["user_accuracy"]) == set(NAMES)
        assert m["kappa"] is None or -1 <= m["kappa"] <= 1
    assert "after each stage" in md and "## Accuracy assessment: progressive" in md
    # The assessment lists the scored classes only ('unknown' is out of the mean).
    assessment = md.split("## Accuracy assessment: progressive", 1)[1].split("\n\n")[1].splitlines()[2:]
    assert [row.split(" | ")[0].strip("| ") for row in assessment] == \
        [c["name"] for c in report["classes"] if c["in_mean"]]
    assert "## Boundaries" in md and "boundary" in report["measurement"]
    for name, m in report["methods"].items():
        assert list(m["boundary_iou"]) == NAMES and 0 <= m["boundary_miou"] <= 1, name
        assert f"| {name} | {100 * m['boundary_miou']:.1f} | {100 * m['boundary_mf']:.1f} |" in md


def _global_scores(seg: Segmenter, scenes, **kwargs):
    in_mean = [c.in_mean for c in seg.config.classes]
    acc = ConfusionMatrix(seg.num_classes, in_mean)
    edges = BoundaryTally(seg.num_classes, in_mean)
    for scene in scenes:
        image, mask = read_scene(scene, seg.config)
        labels = seg.segment(image, normalized=False, **kwargs).labels
        acc.update(labels, torch.from_numpy(mask))
        edges.update(labels, torch.from_numpy(mask))
    return {**acc.scores(), **edges.scores()}


def test_scores_agree_with_the_engine_run_by_hand(ckpt, data, tmp_path):
    out = tmp_path / "bench"
    result, _ = run(ckpt, "--data-root", data, "--out-dir", out, "--samples", "0")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    seg = Segmenter.from_checkpoint(ckpt)
    scenes = list_scenes(seg.config.data, "test", data)
    pyramid = seg.config.pyramid
    full = _global_scores(seg, scenes)
    # Downsample-only is the K = 0 invariant of the full pyramid; patch-only the finest
    # scale alone.
    down = _global_scores(seg, scenes, refine=RefineConfig(points=0))
    patch = _global_scores(seg, scenes, pyramid=pyramid.patch_only())
    methods = report["methods"]
    assert methods["progressive"]["miou"] == pytest.approx(full["miou"])
    assert methods["downsample"]["miou"] == pytest.approx(down["miou"])
    assert methods["patch"]["miou"] == pytest.approx(patch["miou"])
    assert methods["patch"]["accuracy"] == pytest.approx(patch["accuracy"])
    # Boundary scores from counts summed over the split, as the engine's labels give them.
    assert methods["progressive"]["boundary_miou"] == pytest.approx(full["boundary_miou"])
    assert methods["patch"]["boundary_mf"] == pytest.approx(patch["boundary_mf"])
    # The last stage is the final prediction (images are the scene size).
    assert methods["progressive"]["stages"][-1]["miou"] == pytest.approx(full["miou"])
    # The matrix counts every pixel of the split once.
    assert np.asarray(methods["patch"]["confusion_matrix"]).sum() == 2 * 128 * 128
    # The row without the refiner is the engine with refiner=None, per class too.
    bare = _global_scores(seg, scenes, refiner=None)
    assert methods[NO_REFINER]["miou"] == pytest.approx(bare["miou"])
    assert list(methods[NO_REFINER]["iou"]) == NAMES
    for name, iou in zip(NAMES, bare["iou"]):
        assert methods[NO_REFINER]["iou"][name] == pytest.approx(None if np.isnan(iou) else iou, nan_ok=True)
    gain = report["refiner_gain_points"]
    assert gain["miou"] == pytest.approx(100 * (full["miou"] - bare["miou"]))
    md = (out / "report.md").read_text()
    assert any(line.startswith(f"| {NO_REFINER}") and f"{100 * bare['miou']:.1f}" in line
               for line in md.splitlines()) and "What the refiner adds" in md


def test_existing_report_is_kept_without_overwrite(ckpt, data, tmp_path):
    out = tmp_path / "bench"
    assert run(ckpt, "--data-root", data, "--out-dir", out, "--samples", "0", "--limit", "1")[0].exit_code == 0
    before = (out / "report.json").read_bytes()
    result, lines = run(ckpt, "--data-root", data, "--out-dir", out, "--samples", "0")
    assert result.exit_code == 1
    assert "--overwrite" in result.output and lines == []
    assert (out / "report.json").read_bytes() == before
    result, _ = run(ckpt, "--data-root", data, "--out-dir", out, "--samples", "0", "--overwrite")
    assert result.exit_code == 0
    assert json.loads((out / "report.json").read_text())["images"] == 2


def test_without_data_root_the_checkpoints_data_root_is_scored(ckpt, data, tmp_path):
    """--data-root's default is data.root of the run's config, as in train."""
    out = tmp_path / "bench"
    result, lines = run(ckpt, "--set", f"data.root={data}", "--out-dir", out, "--samples", "0",
                        "--limit", "1")
    assert result.exit_code == 0, result.output
    assert [line["id"] for line in lines[:-1]] == ["000001"]
    assert json.loads((out / "report.json").read_text())["data_root"] == str(data)


def test_split_naming_missing_images(ckpt, data, tmp_path):
    (data / "test.txt").write_text("000001\n000777\n000002\n")  # 000777: no such scene
    (data / "000002_mask.png").unlink()
    out = tmp_path / "bench"
    result, lines = run(ckpt, "--data-root", data, "--out-dir", out)
    assert result.exit_code == 1
    assert "000777_sat.jpg" in result.output and "000002_mask.png" in result.output
    assert lines == [] and not out.exists()


def test_mask_of_the_wrong_size(ckpt, data, tmp_path):
    mask = data / "000002_mask.png"
    cv2.imwrite(str(mask), cv2.imread(str(mask))[:100])
    out = tmp_path / "bench"
    result, lines = run(ckpt, "--data-root", data, "--out-dir", out)
    assert result.exit_code == 1
    assert "000002_mask.png" in result.output and "128x100" in result.output
    assert lines == [] and not (out / "report.json").exists()


def test_checkpoint_with_another_class_count(make_checkpoint, data, tmp_path):
    """tiny.yaml's 4 classes (black, yellow, white, blue) cannot read DeepGlobe's colours."""
    ckpt = make_checkpoint(name="four.ckpt")
    out = tmp_path / "bench"
    result, lines = run(ckpt, "--data-root", data, "--out-dir", out)
    assert result.exit_code == 1
    assert "000001_mask.png" in result.output
    assert "4 classes" in result.output and "four.ckpt" in result.output
    assert lines == [] and not (out / "report.json").exists()


def test_one_bad_mask_mid_split_fails_only_that_image(ckpt, data, tmp_path):
    mask = data / "000002_mask.png"
    bgr = cv2.imread(str(mask))
    bgr[:8, :8] = (0, 0, 255)  # red: no DeepGlobe class
    cv2.imwrite(str(mask), bgr)
    out = tmp_path / "bench"
    result, lines = run(ckpt, "--data-root", data, "--out-dir", out, "--samples", "0")
    assert result.exit_code == 1
    assert "000002_mask.png" in result.output and "(255, 0, 0)" in result.output
    assert [line.get("id") for line in lines[:-1]] == ["000001"]
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 1 and not report["complete"]
    assert [f["id"] for f in report["failed"]] == ["000002"]
    assert "Incomplete" in (out / "report.md").read_text()


def test_geotiff_pairs(ckpt, data, tmp_path):
    """The GeoTIFF-pair layout (images/<id>.tif, masks/<id>.tif of class ids) scores the same
    pixels the same way as the DeepGlobe layout they were copied from."""
    import rasterio
    from rasterio.transform import from_origin

    seg = Segmenter.from_checkpoint(ckpt)
    root = tmp_path / "pairs"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    ids = (data / "test.txt").read_text().split()
    for scene in list_scenes(seg.config.data, "test", data):
        image, mask = read_scene(scene, seg.config)
        profile = dict(driver="GTiff", width=128, height=128, crs="EPSG:32633",
                       transform=from_origin(500000, 4000000, 0.5, 0.5))
        with rasterio.open(root / "images" / f"{scene.id}.tif", "w", count=3, dtype="uint8", **profile) as dst:
            dst.write(image)
        with rasterio.open(root / "masks" / f"{scene.id}.tif", "w", count=1, dtype="uint8", **profile) as dst:
            dst.write(mask[None])
    (root / "test.txt").write_text("\n".join(ids) + "\n")

    a, _ = run(ckpt, "--data-root", data, "--out-dir", tmp_path / "a", "--samples", "0", "--limit", "1")
    b, _ = run(ckpt, "--data-root", root, "--out-dir", tmp_path / "b", "--samples", "0", "--limit", "1",
               "--layout", "geotiff")
    assert a.exit_code == 0 and b.exit_code == 0, b.output
    ra = json.loads((tmp_path / "a" / "report.json").read_text())
    rb = json.loads((tmp_path / "b" / "report.json").read_text())
    assert rb["layout"] == "geotiff"
    for name in ("progressive", "downsample", "patch"):
        assert rb["methods"][name]["confusion_matrix"] == ra["methods"][name]["confusion_matrix"]


def test_the_adaptive_row_is_the_runs_engine_adaptive(tiny_config):
    """As the TTA rows are the run's engine.tta: the 'adaptive' row is there exactly when the
    run's engine.adaptive is set (by the checkpoint, --set or the --adaptive-* flags), and
    every other row runs the full method."""
    assert "adaptive" not in [m.name for m in benchmark_methods(tiny_config)]
    config = tiny_config.override({"engine.adaptive.max_crops": 2})
    methods = {m.name: m for m in benchmark_methods(config)}
    assert methods["adaptive"].engine.adaptive == AdaptiveConfig(max_crops=2)
    assert "max_crops=2" in methods["adaptive"].description
    assert all(not m.engine.adaptive.enabled for name, m in methods.items() if name != "adaptive")


def test_every_baseline_is_a_row(tiny_config):
    assert set(BASELINES) <= {m.name for m in benchmark_methods(tiny_config)}


class _LosingPool:
    """A ``Pool`` that runs its tasks here but loses the one at ``lose``, as a Ray worker that
    dies mid-scene does."""

    def __init__(self, segmenter, lose: int) -> None:
        self.segmenter, self.lose = segmenter, lose

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def map_unordered(self, fn, tasks, on_lost):
        for index, task in enumerate(tasks):
            yield index, (on_lost(task, "Ray worker died: killed") if index == self.lose
                          else fn(self.segmenter, *task))


def test_a_failed_or_lost_scene_comes_back_as_a_failed_scene(ckpt, data):
    seg = Segmenter.from_checkpoint(ckpt)
    scenes = list_scenes(seg.config.data, "test", data)
    gone = dataclasses.replace(scenes[1], id="000009", image=data / "000009_sat.jpg")  # no such file
    scenes = [scenes[0], gone, scenes[1]]
    methods = benchmark_methods(seg.config)
    pool = _LosingPool(seg, lose=2)
    assert isinstance(pool, Pool)
    seen = []
    result = run_benchmark(pool, seg.config, scenes, methods, samples=0, warmup=False,
                           on_failure=seen.append)
    (unreadable, lost) = result.failed
    assert unreadable.id == "000009" and "000009_sat.jpg" in unreadable.error
    assert lost == FailedScene("000002", "Ray worker died: killed")
    assert seen == result.failed
    assert [r.id for r in result.images] == ["000001"]
    assert result.tallies["progressive"].matrix.matrix.sum() == 128 * 128  # one scene scored
    # A scene's own failure comes back from the task itself (a Ray worker returns it).
    assert score_scene(seg, gone, methods, 1, False, False, None) == unreadable


def test_sweep_k_adds_a_progressive_row_per_k(ckpt, data, tmp_path):
    result, lines = run(ckpt, "--data-root", data, "--out-dir", tmp_path / "bench", "--sweep-k", "0.5,1.0",
                        "--samples", "0")
    assert result.exit_code == 0, result.output
    methods = json.loads((tmp_path / "bench" / "report.json").read_text())["methods"]
    assert {"progressive (K=0.5)", "progressive (K=1.0)"} <= set(methods)
    assert list(methods["progressive (K=0.5)"]["iou"]) == NAMES
    # K = 1 with an untrained refiner (refined = fine) is patch-only, pixel for pixel.
    assert methods["progressive (K=1.0)"]["confusion_matrix"] == methods["patch"]["confusion_matrix"]
    assert "progressive (K=0.5)" in (tmp_path / "bench" / "report.md").read_text()


def test_crf_adds_progressive_and_patch_rows_with_the_crf(ckpt, data, tmp_path):
    out = tmp_path / "bench"
    result, _ = run(ckpt, "--data-root", data, "--out-dir", out, "--crf", "--set", "refine.crf.iterations=2",
                    "--samples", "0")
    assert result.exit_code == 0, result.output
    methods = json.loads((out / "report.json").read_text())["methods"]
    assert {PROGRESSIVE_CRF, PATCH_CRF} <= set(methods)
    assert "2 iterations" in methods[PROGRESSIVE_CRF]["description"]
    seg = Segmenter.from_checkpoint(ckpt)
    scenes = list_scenes(seg.config.data, "test", data)
    crf = dataclasses.replace(seg.config.refine, crf=dataclasses.replace(seg.config.refine.crf, enabled=True,
                                                                         iterations=2))
    by_hand = _global_scores(seg, scenes, refine=crf)
    assert methods[PROGRESSIVE_CRF]["miou"] == pytest.approx(by_hand["miou"])
    assert methods[PROGRESSIVE_CRF]["boundary_miou"] == pytest.approx(by_hand["boundary_miou"])
    patch = _global_scores(seg, scenes, refine=crf, pyramid=seg.config.pyramid.patch_only())
    assert methods[PATCH_CRF]["miou"] == pytest.approx(patch["miou"])
    assert methods[PATCH_CRF]["seconds_per_image"] > 0 and methods[PATCH_CRF]["peak_memory_mb"] > 50
    md = (out / "report.md").read_text()
    assert f"| {PROGRESSIVE_CRF} |" in md and f"| {PATCH_CRF} |" in md


@pytest.mark.parametrize("value", ["0", "1.5", "a,b", ","])
def test_a_bad_sweep_k_is_a_usage_error(ckpt, data, tmp_path, value):
    result, _ = run(ckpt, "--data-root", data, "--out-dir", tmp_path / "bench", "--sweep-k", value)
    assert result.exit_code == 2 and "--sweep-k" in result.output


def test_one_overall_bar_over_the_scenes(ckpt, data, tmp_path, monkeypatch):
    import magseg.cli.benchmark as benchmark_cli

    bars = []

    class Bar:
        def __init__(self, total, desc, quiet, unit="it"):
            self.total, self.desc, self.n = total, desc, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            self.n += n

    monkeypatch.setattr(benchmark_cli, "progress_bar", Bar)
    result, _ = run(ckpt, "--data-root", data, "--out-dir", tmp_path / "b", "--samples", "0")
    assert result.exit_code == 0, result.output
    assert [(b.desc, b.total, b.n) for b in bars] == [("benchmark", 2, 2)]  # scenes: an ETA

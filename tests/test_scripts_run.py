"""The measuring and figure scripts the docs cite still run, each on a tiny model or input, as
a user runs them (a process of its own), and print what their docstrings promise. Scripts are
not imported by the package: without this, an engine change breaks one silently until
someone needs its figure. (Other scripts have tests of their own, e.g.
test_refiner_runtime_script, test_runtime_miou_script, test_gpu_check; bench_fusion's first
compiled call takes a minute: it does not run here.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from synthetic import DEEPGLOBE_CLASSES_OVERRIDE, SceneSpec, write_dataset

from magseg.engine import runtime as rt

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def run_script(name: str, *args: object, cwd: Path | None = None) -> str:
    done = subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{name} failed:\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture
def deepglobe_tiny(tmp_path, make_checkpoint):
    """A tiny checkpoint with DeepGlobe's classes and a two-scene test split of its data."""
    write_dataset(tmp_path / "data", {"train": 1, "test": 2}, SceneSpec(size=(128, 128)), seed=0)
    return make_checkpoint(DEEPGLOBE_CLASSES_OVERRIDE), tmp_path / "data"


@pytest.mark.skipif(not rt.installed("onnxruntime"),
                    reason="onnxruntime, onnx and onnxscript not installed (magseg[onnx])")
def test_bench_engine_times_each_runtime_and_compares_its_labels_with_torch(tmp_path):
    out = json.loads(run_script("bench_engine.py", "--config", TINY, "--arch", "Unet", "--encoder", "tu-test_resnet",
                                "--size", 64, "--repeat", 1, "--methods", "backbone,engine,own",
                                "--runtime", "torch", "--runtime", "onnxruntime", "--precision", "fp32",
                                "--sections", "--json", tmp_path / "b.json"))
    assert json.loads((tmp_path / "b.json").read_text()) == out
    assert set(out["runs"]) == {"fp32", "onnxruntime-fp32"}
    for name, run in out["runs"].items():
        stages = len(out["scales"])
        assert len(run["crops"]["engine"]) == stages == len(run["engine_stage_seconds"]) == 3
        assert 0 < run["seconds"]["backbone"] < run["seconds"]["engine"], name
        assert run["seconds"]["own"] > 0 and run["ratios"]["engine_over_backbone"] > 1
        assert run["sections"]["segment"]["calls"] >= 1 and run["sections"]["run_backbone"]["seconds"] > 0
    # The same fp32 graph in another runtime: its labels are torch's (to float rounding).
    assert out["runs"]["onnxruntime-fp32"]["vs_torch_fp32"]["labels_agree"] >= 0.999


def test_bench_refiner_times_the_gate_and_the_convolutions_on_one_engine_batch():
    out = json.loads(run_script("bench_refiner.py", "--config", TINY, "--repeat", 2, "--threads", 1))
    # One engine batch of the tiny config: 4 crops of its 4 classes at its 32 px input.
    assert out["batch"] == [4, 4, 32, 32] and out["threads"] == 1
    for key in ("convolutions_nchw_ms", "convolutions_channels_last_ms", "refiner_no_gate_ms",
                "refiner_gate_ms", "backbone_ms"):
        assert out[key] > 0, key
    assert out["cells"][:2] == [4, 8]  # the crops' window cells: C fine + C coarse channels


def test_bench_vector_polygonises_a_class_map_and_reports_its_memory():
    out = json.loads(run_script("bench_vector.py", "--size", 512))
    assert out["size"] == 512 and out["polygons"] > 7  # blobs of 7 classes, plus the lines
    assert out["peak_rss_mb"] >= out["imports_rss_mb"] > 0 and out["gpkg_mb"] > 0


def test_quicklook_figures_draws_every_picture_at_its_shape(tmp_path):
    sizes = json.loads(run_script("quicklook_figures.py", "--out", tmp_path / "img"))
    names = {Path(p).name for p in sizes}
    assert {"preview_100x100.png", "preview_90x1024.png", "preview_1024x120.png", "miou_per_stage.png",
            "sample.png"} <= names
    for path, size in sizes.items():
        assert Path(path).stat().st_size == size
    tall = Image.open(tmp_path / "img" / "preview_90x1024.png").size
    wide = Image.open(tmp_path / "img" / "preview_1024x120.png").size
    assert tall[1] > tall[0] and wide[0] > wide[1]


def test_refiner_diagnostics_follows_one_class_through_the_refiner(deepglobe_tiny):
    ckpt, data = deepglobe_tiny
    out = json.loads(run_script("refiner_diagnostics.py", ckpt, data, "--split", "test", "--limit", 1))
    assert out["scenes"] == 1 and out["class"] == "urban" and out["split"] == "test"
    assert 0 <= out["iou_fine"] <= 100 and 0 <= out["iou_refined_k1"] <= 100  # percent
    assert 0 < out["class_pixel_share"] < 100 and 0 < out["mean_gate_elsewhere"] <= 1
    assert len(out["erased_by_fine_certainty"]) == len(out["erased_by_object_side"]) == 4


def test_seam_figure_draws_a_map_and_its_uncertainty_per_margin(deepglobe_tiny, tmp_path):
    ckpt, data = deepglobe_tiny
    run_script("seam_figure.py", ckpt, data, "--margins", "0,8", "--out", tmp_path / "seams.png")
    width, height = Image.open(tmp_path / "seams.png").size
    # Two 128 px scenes' columns (one per margin) side by side, map over uncertainty.
    assert height == 2 * 128 and 2 * 128 <= width < 3 * 128


def test_trace_setting_finds_where_k_is_parsed_and_where_the_engine_reads_it():
    out = json.loads(run_script("trace_setting.py"))
    assert out["setting"] == "refine.points=0.25"
    assert out["parsed"]["path"][0] == "magseg.cli.app" and out["parsed"]["path"][-1] == "magseg.config"
    assert out["read"]["path"][-1] == "magseg.engine.refine_step"
    assert out["read"]["calls"][-1] == "magseg.engine.refine_step.num_points"


def test_bench_predict_compares_a_checkpoint_with_its_own_patch_only_window(make_checkpoint, tmp_path):
    """With --checkpoint, patch-only is that checkpoint's finest stage (not DeepGlobe's 2448 px
    one) and the report names that model."""
    ckpt = make_checkpoint()
    out = json.loads(run_script("bench_predict.py", "--sizes", 256, "--baseline", 256, "--checkpoint", ckpt,
                                "--work-dir", tmp_path / "work", "--threads", 1))
    assert out["model"].startswith(f"{ckpt}: Unet/tu-test_resnet, pyramid 32x32 -> 64x64 -> 128x128")
    run = out["results"]["256"]
    # A 256 px raster is four 128 px windows: 1 + 4 + 16 crops of 32 px each progressive,
    # the 16 of the finest stage patch-only.
    assert run["crops"] == 4 * (1 + 4 + 16) and run["patch_only"]["crops"] == 4 * 16
    assert run["wall_over_patch_only"] == round(run["wall_s"] / run["patch_only"]["wall_s"], 3)
    assert run["peak_rss_mb"] > 0 and out["rss_ratio"] == 1.0

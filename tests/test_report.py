"""report.md and the benchmark plots from report dicts made here: the best of each column
alone in bold, rows that would repeat another left out or marked, the accuracy assessment,
and plots read back (colours, legends, axis, layout)."""

from __future__ import annotations

import io

import matplotlib
import numpy as np
import pytest

from magseg.config import ClassSpec
from magseg.evaluation.benchmark import NO_REFINER, Sample
from magseg.evaluation.report import (
    Column,
    figure_confusion,
    figure_miou_per_stage,
    figure_sample,
    plot_miou_per_stage,
    render_markdown,
    render_table,
)

CLASSES = [ClassSpec(0, "unknown", (0, 0, 0), in_mean=False), ClassSpec(1, "urban", (0, 255, 255)),
           ClassSpec(2, "water", (0, 0, 255))]
NAMES = [c.name for c in CLASSES]
# Rows: ground truth unknown, urban, water; columns: prediction.
MATRIX = [[5, 1, 0], [0, 6, 2], [0, 3, 9]]


def _method(miou, matrix=MATRIX, stages=None, seconds=1.0, **extra):
    m = {"description": "d", "miou": miou, "iou": {n: miou for n in NAMES}, "accuracy": 0.8,
         "fwiou": 0.7, "seconds_per_image": seconds, "peak_memory_mb": 500.0,
         "confusion_matrix": matrix, **extra}
    if stages:
        m["stages"] = [{"stage": k, "size": [32 * 2 ** k] * 2, "miou": v, "refined_fraction": 0.1,
                        "crops_run": 1, "crops_total": 1, "seconds_per_image": 0.1}
                       for k, v in enumerate(stages)]
    return m


def _report(methods, refiner=True, gain=None):
    return {
        "split": "test", "data_root": "d", "checkpoint": "c.ckpt", "images": 2, "failed": [],
        "classes": [{"id": c.id, "name": c.name, "in_mean": c.in_mean} for c in CLASSES],
        "config": {"pyramid": {"scales": [[32, 32], [64, 64]], "crop": [32, 32]},
                   "refine": {"points": 0.5}, "refiner": {"enabled": refiner}},
        "environment": {"device": "cpu", "torch_threads": 1, "cpu": {}},
        "measurement": {"miou": "m", "time": "t", "memory": "p"},
        "methods": methods, "margins_miou_points": {}, "refiner_gain_points": gain, "plots": [],
    }


def test_only_the_best_of_each_column_is_bold():
    rows = {"a": {"x": 0.50, "t": 2.0, "same": 0.3}, "b": {"x": 0.7404, "t": 1.0, "same": 0.3},
            "c": {"x": 0.7396, "t": None, "same": 0.3}}
    lines = render_table(rows, [Column("x", lambda r: r["x"]),
                                Column("t", lambda r: r["t"], lambda v: "n/a" if v is None else f"{v:.2f}", "min"),
                                Column("same", lambda r: r["same"])])
    assert lines[:2] == ["| method | x | t | same |", "|---|---|---|---|"]
    # b and c both show 74.0, the best: both bold; the lowest time is the best; a column
    # where every row ties has no bold.
    assert lines[2:] == ["| a | 50.0 | 2.00 | 30.0 |", "| b | **74.0** | **1.00** | 30.0 |",
                         "| c | **74.0** | n/a | 30.0 |"]


def test_no_refiner_row_and_section_only_when_a_refiner_ran():
    other = [[5, 0, 1], [0, 7, 1], [0, 2, 10]]
    methods = {"progressive": _method(0.7, other), NO_REFINER: _method(0.6), "patch": _method(0.65)}
    gain = {"miou": 10.0, "iou": {"urban": 10.0, "water": 10.0}}
    md = render_markdown(_report(methods, refiner=True, gain=gain))
    assert f"| {NO_REFINER} | 60.0 |" in md and "## What the refiner adds" in md
    assert "| progressive | **70.0** |" in md

    # Switched off in the checkpoint: no such row (the benchmark runs none), no section.
    off = {"progressive": _method(0.7, other), "patch": _method(0.65)}
    md = render_markdown(_report(off, refiner=False))
    assert NO_REFINER not in md.split("## Accuracy")[0].split("No refiner ran")[0]
    assert "No refiner ran" in md and "What the refiner adds" not in md

    # A refiner that changed nothing: the row is marked identical.
    same = {"progressive": _method(0.7), NO_REFINER: _method(0.7), "patch": _method(0.65, other)}
    md = render_markdown(_report(same, refiner=True, gain={"miou": 0.0, "iou": {"urban": 0.0}}))
    assert f"| {NO_REFINER} (= progressive) | **70.0** |" in md
    assert "The two predictions are identical" in md


def test_accuracy_assessment_table_in_percent():
    from magseg.config import Config
    from magseg.evaluation.report import accuracy_assessment

    class _Config:  # only what accuracy_assessment reads
        classes = CLASSES

    extra = accuracy_assessment(np.asarray(MATRIX), _Config())  # type: ignore[arg-type]
    # producer's = diagonal / row: 5/6, 6/8, 9/12; user's = diagonal / column: 5/5, 6/10, 9/11.
    assert extra["producer_accuracy"] == pytest.approx({"unknown": 5 / 6, "urban": 0.75, "water": 0.75})
    assert extra["user_accuracy"] == pytest.approx({"unknown": 1.0, "urban": 0.6, "water": 9 / 11})
    # kappa over the 20 pixels of counted ground truth (urban, water rows): p_o = 15/20;
    # rows (8, 12), columns over those rows (0, 9, 11): p_e = (8*9 + 12*11) / 400 = 0.51.
    assert extra["kappa"] == pytest.approx((0.75 - 0.51) / (1 - 0.51))
    md = render_markdown(_report({"progressive": _method(0.7, **extra), "patch": _method(0.6)}))
    assert "| urban | 75.0 | 60.0 |" in md and "| water | 75.0 | 81.8 |" in md
    assert f"Cohen's kappa: {(0.75 - 0.51) / 0.49:.3f}" in md
    assert Config  # the real config type has the same classes attribute


def _png(fig) -> np.ndarray:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    return (matplotlib.image.imread(buf)[..., :3] * 255).round().astype(int)


def _has(image: np.ndarray, colour: str, at_least: int = 30) -> bool:
    rgb = np.round(np.asarray(matplotlib.colors.to_rgb(colour)) * 255)
    return int((np.abs(image - rgb) <= 2).all(-1).sum()) >= at_least


def test_stage_plot_colours_identical_series_and_axis_start():
    methods = {"progressive": _method(0.74, stages=[0.62, 0.74]),
               NO_REFINER: _method(0.74, stages=[0.62, 0.74]),
               "downsample": _method(0.62), "patch": _method(0.63)}
    fig = figure_miou_per_stage(_report(methods))
    ax = fig.axes[0]
    colours = [matplotlib.colors.to_hex(line.get_color()) for line in ax.get_lines()]
    assert len(set(colours)) == 4  # one per method, the baselines too
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"{NO_REFINER} (= progressive)" in labels
    same = next(line for line in ax.get_lines() if line.get_label() == f"{NO_REFINER} (= progressive)")
    assert same.get_linestyle() == ":"  # drawn over the other, both visible
    bottom = ax.get_ylim()[0]
    assert bottom > 0 and f"axis starts at {bottom:g}" in ax.get_ylabel()
    image = _png(fig)
    for colour in colours:
        assert _has(image, colour), colour
    assert plot_miou_per_stage(_report(methods)).startswith(b"\x89PNG")


def test_sample_panels_wrap_and_refined_masks_have_a_legend():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (40, 40)).astype(np.uint8)
    sample = Sample("s", np.zeros((40, 40, 3), np.uint8), labels,
                    {n: labels for n in ("progressive", NO_REFINER, "downsample", "patch", "adaptive")},
                    rng.random((40, 40)), [labels == 1, labels == 2])
    fig = figure_sample(sample, CLASSES)
    panels = [ax for ax in fig.axes if ax.get_images() and ax.get_title()]
    assert len(panels) == 10
    places = [(ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start) for ax in panels]
    assert max(c for _, c in places) + 1 <= 5 and max(r for r, _ in places) + 1 == 2
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:3] == NAMES and "refined (R's label)" in legend and "kept (coarser stage)" in legend
    bars = [child for ax in fig.axes for child in ax.child_axes]  # the uncertainty's colour bar
    assert [b.get_xlabel() for b in bars] == ["1 - certainty"]
    height, width = _png(fig).shape[:2]
    assert width < 2 * height * 2  # no longer one 2016 x 340 row


def test_confusion_plot_is_normalised_by_ground_truth():
    fig = figure_confusion(_report({"patch": _method(0.6), "progressive": _method(0.7)}))
    ax = fig.axes[0]
    shown = ax.get_images()[0].get_array()
    # Every row with ground truth sums to 100 %: urban 0/8, 6/8, 2/8.
    np.testing.assert_allclose(np.asarray(shown).sum(1), 100)
    np.testing.assert_allclose(np.asarray(shown)[1], [0, 75, 25])
    assert "progressive" in ax.get_title() and ax.get_ylabel() == "ground truth"
    assert [t.get_text() for t in ax.texts][3:6] == ["0", "75", "25"]


def test_the_header_names_the_backbone_runtime_beside_its_precision():
    """report.md's first lines say what computed the scores: a backbone run in OpenVINO at
    int8 says so; torch, the default, is not named."""
    report = _report({"progressive": _method(0.7)})
    cpu = {"model": "AMD EPYC", "capability": "AVX2"}
    report["environment"] = {"device": "cpu", "torch_threads": 2, "cpu": cpu, "precision": "int8",
                             "backbone_runtime": "openvino"}
    assert "device cpu, precision int8 in OpenVINO (AMD EPYC, AVX2, 2 threads)." in render_markdown(report)
    report["environment"].update(precision="fp32", backbone_runtime="torch")
    assert "device cpu, precision fp32 (AMD EPYC, AVX2, 2 threads)." in render_markdown(report)


def test_the_environment_is_what_the_segmenter_reports(tmp_path):
    """report.json's environment: the backbone runtime resolved, and the precision it
    computes in (ONNX Runtime's kernels are fp32 whatever was asked)."""
    from magseg.config import load_config
    from magseg.engine import runtime as rt
    from magseg.evaluation.report import _environment
    from magseg.segmenter import Segmenter

    from conftest import CONFIGS

    config = load_config(CONFIGS / "tiny.yaml").override(["engine.precision=bf16"])
    env = _environment(config)
    assert env["backbone_runtime"] == "torch" and env["precision"] == "bf16"
    segmenter = Segmenter.from_config(config)
    assert {k: env[k] for k in ("device", "precision", "backbone_runtime")} == \
        {k: segmenter.runtime[k] for k in ("device", "precision", "backbone_runtime")}
    if rt.installed("onnxruntime"):
        ort = config.override(["engine.runtime=onnxruntime", f"engine.cache_dir={tmp_path}"])
        assert (_environment(ort)["backbone_runtime"], _environment(ort)["precision"]) == ("onnxruntime", "fp32")


"""The benchmark's outputs: ``report.json``, ``report.md`` and plots (matplotlib, Agg).

``build_report`` turns a ``BenchmarkResult`` into one plain dict (the JSON file);
``render_markdown`` and the plots are made from that dict and the kept samples only, so the
files always agree with each other. ``write_report`` writes everything atomically.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from magseg.config import ClassSpec, Config
from magseg.errors import OutputExistsError
from magseg.evaluation.benchmark import (
    BASELINES,
    NO_REFINER,
    BenchmarkResult,
    Sample,
    defined,
    method_summary,
)
from magseg.evaluation.metrics import scores
from magseg.evaluation.reliability import PLOT_RELIABILITY, calibration_markdown, reliability_figure
from magseg.io.atomic import atomic_write

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_IOU = "per_class_iou.png"
PLOT_STAGES = "miou_per_stage.png"
PLOT_CONFUSION = "confusion_matrix.png"
PLOT_BOUNDARY = "per_class_boundary_iou.png"
SAMPLES_DIR = "samples"

TIME_NOTE = (
    "wall time of the engine call per image (image read and normalised once, outside the "
    "timing), mean over the images, after one untimed warm-up run of every method"
)
MEMORY_NOTE = {
    "VmHWM": "peak resident set size of the benchmark process during the method's engine calls "
             "(Linux VmHWM, reset before each call; includes the loaded models and the image); "
             "peak_memory_increase_mb is that peak minus the resident size when the call started",
    "ru_maxrss": "peak resident set size of the process since it started (ru_maxrss): an upper "
                 "bound, because this system cannot reset the peak between methods",
}
BOUNDARY_NOTE = (
    "boundary IoU (Cheng et al. 2021): per class, the IoU of the truth's and the prediction's "
    "pixels within d of their own contours (square neighbourhood, the image frame counts), "
    "d = 2 % of the image diagonal; boundary F: contour pixels (4-neighbour) matched within 0.8 % "
    "of the diagonal, F of precision and recall; both from counts summed over the split, "
    "means over the classes with in_mean"
)


def sample_plot_name(sample_id: str) -> str:
    return f"{SAMPLES_DIR}/{sample_id}.png"


def build_report(
    result: BenchmarkResult,
    *,
    checkpoint: str | Path,
    data_root: str | Path,
    split: str,
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The content of ``report.json``: every method's scores, time and memory, the stages of
    the staged methods, the settings that made them, and the plot files."""
    config = result.config
    methods = {name: {**method_summary(t, config), **accuracy_assessment(t.matrix.matrix, config)}
               for name, t in result.tallies.items()}
    how = next((t.memory_how for t in result.tallies.values()), "VmHWM")
    plots = [PLOT_IOU, PLOT_CONFUSION]
    if any("boundary_iou" in m for m in methods.values()):
        plots.append(PLOT_BOUNDARY)
    if any("stages" in m for m in methods.values()):
        plots.append(PLOT_STAGES)
    if any(m.get("calibration") for m in methods.values()):
        plots.append(PLOT_RELIABILITY)
    plots += [sample_plot_name(s.id) for s in result.samples]
    from magseg import __version__

    report = {
        "magseg_version": __version__,
        "command": list(command) if command else None,
        "checkpoint": str(checkpoint),
        "data_root": str(data_root),
        "split": split,
        "layout": config.data.layout,
        "images": len(result.images),
        "failed": [dataclasses.asdict(f) for f in result.failed],
        "complete": not result.failed,
        "classes": [{"id": c.id, "name": c.name, "in_mean": c.in_mean} for c in config.classes],
        "config": _config_summary(config),
        "environment": _environment(config),
        "measurement": {"time": TIME_NOTE, "memory": MEMORY_NOTE[how],
                        "miou": "one confusion matrix per method summed over the split; mean over "
                                "the classes with in_mean (DeepGlobe: 'unknown' is counted in the "
                                "matrix but left out of the mean)",
                        "boundary": BOUNDARY_NOTE},
        "methods": methods,
        "margins_miou_points": _margins(methods),
        "refiner_gain_points": _refiner_gain(methods),
        "plots": plots,
        "per_image": [
            {"id": r.id, "size": list(r.size), "methods": r.methods} for r in result.images
        ],
    }
    return report


def accuracy_assessment(matrix: Any, config: Config) -> dict[str, Any]:
    """Producer's and user's accuracy per class name and Cohen's kappa of one method's
    confusion matrix (``magseg.evaluation.metrics.scores``; None where undefined)."""
    s = scores(matrix, [c.in_mean for c in config.classes])
    names = [c.name for c in config.classes]
    return {"producer_accuracy": {n: defined(v) for n, v in zip(names, s["producer_accuracy"])},
            "user_accuracy": {n: defined(v) for n, v in zip(names, s["user_accuracy"])},
            "kappa": defined(s["kappa"])}


def _points(a: float | None, b: float | None) -> float | None:
    """``a - b`` in percentage points; None when either is undefined."""
    return None if a is None or b is None else 100 * (a - b)


def _margins(methods: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Progressive's mIoU minus each baseline's, in points."""
    if "progressive" not in methods:
        return {}
    return {f"progressive_minus_{base}": _points(methods["progressive"]["miou"], methods[base]["miou"])
            for base in BASELINES if base in methods}


def _refiner_gain(methods: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """What the refiner adds: progressive minus the same without it, overall and per class,
    in points (None without both rows)."""
    if "progressive" not in methods or NO_REFINER not in methods:
        return None
    on, off = methods["progressive"], methods[NO_REFINER]
    return {"miou": _points(on["miou"], off["miou"]),
            "iou": {c: _points(on["iou"][c], off["iou"][c]) for c in on["iou"]}}


def _config_summary(config: Config) -> dict[str, Any]:
    """The settings that made the scores."""
    return {
        "name": config.name,
        "model": {"arch": config.model.arch, "encoder": config.model.encoder},
        "refiner": dataclasses.asdict(config.refiner),
        "pyramid": {"scales": [list(s) for s in config.pyramid.scales], "crop": list(config.pyramid.crop),
                    "input": list(config.pyramid.input), "scene": list(config.pyramid.scene),
                    "margin": config.pyramid.margin, "margin_pixels": list(config.pyramid.margin_pixels)},
        "refine": {"points": config.refine.points, "kernel": config.refine.kernel, "border": config.refine.border},
        "engine": {"batch_size": config.engine.batch_size, "device": config.engine.device,
                   "precision": config.engine.precision},
    }


def _environment(config: Config) -> dict[str, Any]:
    """The device, the backbone's runtime and the precision it computes in, the CPU model and
    its bf16/AMX support, and the software."""
    from magseg.segmenter import run_info

    return {
        **run_info(config),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


# --------------------------------------------------------------------------- markdown


def _pct(value: float | None) -> str:
    """A fraction as a percentage with one decimal: the one unit of every score people read
    (report.md, the command's summary, the training log); JSON keeps fractions."""
    return "n/a" if value is None else f"{100 * value:.1f}"


def _coefficient(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


@dataclass(frozen=True)
class Column:
    """One column of a report.md table: its ``title``, the cell's number from a row's dict
    (None: undefined), how that number is shown, and whether the highest (``max``) or
    lowest (``min``) value is the column's best (bold), or None for no best."""

    title: str
    value: Callable[[dict[str, Any]], float | None]
    show: Callable[[float | None], str] = _pct
    best: str | None = "max"


def render_table(rows: dict[str, dict[str, Any]], columns: Sequence[Column], first: str = "method",
                 labels: dict[str, str] | None = None) -> list[str]:
    """A markdown table, one row per entry of ``rows`` (its name in the first column, or
    ``labels[name]``), with the best value of each column in bold: every cell that shows
    what the best shows (74.04 and 73.96 both show 74.0, both bold), none where all rows
    show the same."""
    cells = {name: [c.show(c.value(row)) for c in columns] for name, row in rows.items()}
    best = [_best_shown(column, list(rows.values())) for column in columns]
    for k, top in enumerate(best):
        if all(texts[k] == top for texts in cells.values()):
            best[k] = None  # every row ties: no best
    header = [first, *(c.title for c in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, texts in cells.items():
        texts = [f"**{t}**" if t == b else t for t, b in zip(texts, best)]
        lines.append("| " + " | ".join([(labels or {}).get(name, name), *texts]) + " |")
    return lines


def _best_shown(column: Column, rows: Sequence[dict[str, Any]]) -> str | None:
    """How the column's best value is shown; None where it has no best (no ranking, one
    row, or no values)."""
    values = [v for v in (column.value(row) for row in rows) if v is not None]
    if column.best is None or len(rows) < 2 or not values:
        return None
    return column.show(max(values) if column.best == "max" else min(values))


def method_columns(report: dict[str, Any]) -> list[Column]:
    """The methods table's columns: mIoU, IoU of each counted class, overall accuracy,
    FWIoU, kappa, time and memory. A new score is one more Column here."""
    counted = [c["name"] for c in report["classes"] if c["in_mean"]]
    return [
        Column("mIoU", lambda m: m["miou"]),
        *(Column(c, lambda m, c=c: m["iou"][c]) for c in counted),
        Column("OA", lambda m: m["accuracy"]),
        Column("FWIoU", lambda m: m["fwiou"]),
        Column("kappa", lambda m: m.get("kappa"), _coefficient),
        Column("s/image", lambda m: m["seconds_per_image"], _seconds, "min"),
        Column("peak MB", lambda m: m["peak_memory_mb"], lambda v: "n/a" if v is None else f"{v:.0f}", "min"),
    ]


def refiner_ran(report: dict[str, Any]) -> bool:
    """Whether the benchmark ran a refiner: the checkpoint's config enables it, and a row
    without it was scored (a checkpoint with the refiner switched off has neither)."""
    return bool(report["config"].get("refiner", {}).get("enabled", True)) and NO_REFINER in report["methods"]


def same_rows(report: dict[str, Any]) -> dict[str, str]:
    """Methods whose confusion matrix (and so every score) equals an earlier method's: name
    -> that method's name. Their rows are labelled ``(= name)``."""
    return identical_to({n: [float(v) for row in m["confusion_matrix"] for v in row]
                         for n, m in report["methods"].items() if "confusion_matrix" in m})


def _methods_table(report: dict[str, Any]) -> list[str]:
    """The methods table: without the no-refiner row where no refiner ran (it would repeat
    progressive), rows identical to another marked ``(= other)``."""
    rows = {n: m for n, m in report["methods"].items() if n != NO_REFINER or refiner_ran(report)}
    same = same_rows(report)
    labels = {n: f"{n} (= {same[n]})" for n in rows if n in same}
    lines = render_table(rows, method_columns(report), labels=labels)
    notes = ["IoU, OA (overall accuracy) and FWIoU in %, kappa is Cohen's; the best of each column in bold."]
    if not refiner_ran(report):
        notes.append(f"No refiner ran (refiner.enabled is false in the checkpoint), so there is no "
                     f"`{NO_REFINER}` row.")
    notes += [f"`{n}`: {m['description']}." for n, m in rows.items()]
    return [*lines, "", " ".join(notes), ""]


def _accuracy_table(report: dict[str, Any], name: str) -> list[str]:
    """Producer's and user's accuracy per class of one method, in %."""
    m = report["methods"][name]
    if "producer_accuracy" not in m:
        return []
    # The classes scored (not 'unknown'): the pixels of the others are not assessed, so their
    # producer's accuracy would read 0.
    classes = {c["name"]: {"producer": m["producer_accuracy"][c["name"]], "user": m["user_accuracy"][c["name"]]}
               for c in report["classes"] if c["in_mean"]}
    columns = [Column("producer's accuracy", lambda r: r["producer"], best=None),
               Column("user's accuracy", lambda r: r["user"], best=None)]
    return [f"## Accuracy assessment: {name}", "",
            *render_table(classes, columns, first="class"), "",
            "Producer's accuracy: the share of a class's ground-truth pixels predicted as it "
            "(100 - omission error). User's accuracy: the share of the pixels predicted as a class "
            f"that are it (100 - commission error). In %. Cohen's kappa: {_coefficient(m.get('kappa'))}.", ""]


def _stages_tables(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    same = same_rows(report)
    for name, m in report["methods"].items():
        if "stages" not in m or name in same or (name == NO_REFINER and not refiner_ran(report)):
            continue
        lines += [f"## {name}: after each stage", "",
                  "| stage | size | mIoU | pixels refined | crops run | s/image |", "|---|---|---|---|---|---|"]
        for st in m["stages"]:
            lines.append(
                f"| {st['stage']} | {'x'.join(map(str, st['size']))} | {_pct(st['miou'])} | "
                f"{100 * st['refined_fraction']:.1f}% | {st['crops_run']}/{st['crops_total']} | "
                f"{st['seconds_per_image']:.2f} |"
            )
        lines.append("")
    return lines


def _machine(env: dict[str, Any]) -> str:
    """``device cpu, precision bf16 (AMD EPYC, AVX512, native bf16, 2 threads)``; with a
    backbone runtime other than torch, ``precision int8 in OpenVINO``."""
    cpu = env.get("cpu") or {}
    native = [name for name, key in (("native bf16", "avx512_bf16"), ("AMX", "amx")) if cpu.get(key)]
    where = ", ".join([cpu.get("model", "?"), cpu.get("capability", "?"), *native,
                       f"{env['torch_threads']} threads"])
    gpu = f", GPU {env['gpu']}" if env.get("gpu") else ""
    runtime = env.get("backbone_runtime") or "torch"
    name = RUNTIME_NAMES.get(runtime, runtime)
    inside = f" in {name}" if name else ""
    return f"device {env['device']}{gpu}, precision {env.get('precision', '?')}{inside} ({where})"


# How report.md names a backbone runtime (torch, the default, goes unnamed).
RUNTIME_NAMES = {"torch": None, "onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the methods table, the accuracy assessment, the stages tables, the
    margins, what the refiner adds (where one ran) and the plots."""
    counted = [c["name"] for c in report["classes"] if c["in_mean"]]
    lines = [
        f"# magseg benchmark: {report['split']} split of {report['data_root']}",
        "",
        f"Checkpoint `{report['checkpoint']}`, {report['images']} image(s), "
        f"pyramid {' -> '.join('x'.join(map(str, s)) for s in report['config']['pyramid']['scales'])}, "
        f"crop {'x'.join(map(str, report['config']['pyramid']['crop']))}, "
        f"margin {report['config']['pyramid'].get('margin', 0)}, "
        f"K = {report['config']['refine']['points']}, {_machine(report['environment'])}.",
        "",
    ]
    if report["failed"]:
        lines += [f"**Incomplete: {len(report['failed'])} image(s) failed** (scores are over the others):", ""]
        lines += [f"- `{f['id']}`: {f['error']}" for f in report["failed"]] + [""]
    lines += _methods_table(report)
    lines += _accuracy_table(report, confusion_method(report))
    lines += _stages_tables(report)
    lines += _seam_lines(report)
    if report["margins_miou_points"]:
        lines += ["## Margins", ""]
        lines += [f"- {k.replace('_', ' ')}: {v:+.1f} mIoU points" if v is not None else f"- {k}: n/a"
                  for k, v in report["margins_miou_points"].items()]
        lines.append("")
    lines += _boundary_lines(report, counted)
    gain = report.get("refiner_gain_points")
    if gain is not None and refiner_ran(report):
        per_class = ", ".join(f"{c} {v:+.1f}" for c, v in gain["iou"].items() if v is not None and c in counted)
        same = same_rows(report).get(NO_REFINER) == "progressive"
        lines += ["## What the refiner adds", "",
                  f"`progressive` minus `{NO_REFINER}`: "
                  + ("n/a" if gain["miou"] is None else f"{gain['miou']:+.1f} mIoU points")
                  + (f"; IoU points per class: {per_class}." if per_class else ".")
                  + (" The two predictions are identical on this split." if same else ""), ""]
    lines += calibration_markdown(report)
    lines += ["## How this was measured", "",
              f"- mIoU: {report['measurement']['miou']}.",
              *([f"- Boundaries: {report['measurement']['boundary']}."]
                if "boundary" in report["measurement"] else []),
              f"- Time: {report['measurement']['time']}.",
              f"- Memory: {report['measurement']['memory']}.", ""]
    if report.get("command"):
        lines += ["Command:", "", "    " + " ".join(report["command"]), ""]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]] + [""]
    return "\n".join(lines)


def _seam_lines(report: dict[str, Any]) -> list[str]:
    """The seam table: each method's final labels across each stage's crop borders."""
    scales = report["config"]["pyramid"]["scales"]
    rows = [(name, m.get("seam_scores")) for name, m in report["methods"].items()]
    if not any(seams for _, seams in rows):
        return []
    header = ["method", *("x".join(map(str, s)) for s in scales)]
    lines = ["## Seams: label changes across each stage's crop borders", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, seams in rows:
        cells = ["-" if v is None else f"{v:.2f}" for v in (seams or [None] * len(scales))]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return lines + ["", "Change rate across the crop borders of each stage of the pyramid, over the "
                    "change rate across the map's other lines at the same phase of its upsampling period "
                    "(1.00: no seam; - : one crop, no border); magseg.evaluation.seams.", ""]
def _boundary_lines(report: dict[str, Any], counted: Sequence[str]) -> list[str]:
    """The boundary table: each method's boundary mIoU and mean F, and boundary IoU per class."""
    rows = {n: m for n, m in report["methods"].items() if "boundary_iou" in m}
    if not rows:
        return []
    header = ["method", "boundary mIoU", "boundary F", *counted]
    lines = ["## Boundaries", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in rows.items():
        lines.append("| " + " | ".join([name, _pct(m["boundary_miou"]), _pct(m["boundary_mf"]),
                                        *(_pct(m["boundary_iou"][c]) for c in counted)]) + " |")
    return lines + ["", "Boundary IoU per class and the means in %; how they are measured is below.", ""]


# --------------------------------------------------------------------------- plots


def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    return plt


def method_colours(report: dict[str, Any]) -> dict[str, str]:
    """One colour per method, the same in every plot (matplotlib's ten-colour cycle, in
    the report's order; beyond ten, a second cycle)."""
    cycle = [f"C{k}" for k in range(10)] + [f"tab:{c}" for c in ("olive", "cyan", "pink", "gray")]
    return {name: cycle[k % len(cycle)] for k, name in enumerate(report["methods"])}


def identical_to(series: dict[str, Sequence[float | None]]) -> dict[str, str]:
    """For each series equal to an earlier one (value by value), the name of the first
    series it equals: those would be drawn exactly on top of each other."""
    seen: dict[tuple, str] = {}
    out = {}
    for name, values in series.items():
        key = tuple(None if v is None else round(v, 9) for v in values)
        if key in seen:
            out[name] = seen[key]
        else:
            seen[key] = name
    return out


def plot_per_class_iou(report: dict[str, Any], key: str = "iou", mean: str = "miou",
                       title: str = "Per-class IoU by method") -> bytes:
    """Grouped bars: IoU of every counted class (and mIoU) for every method; ``key``,
    ``mean`` and ``title`` draw another per-class score (boundary IoU) the same way."""
    plt = _pyplot()
    counted = [c["name"] for c in report["classes"] if c["in_mean"]]
    groups = [*counted, "mean" if mean != "miou" else "mIoU"]
    methods = list(report["methods"])
    colours = method_colours(report)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(groups) * max(1, len(methods)) / 2), 4))
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(groups))
    for k, name in enumerate(methods):
        m = report["methods"][name]
        values = [m[key][c] for c in counted] + [m[mean]]
        heights = [0 if v is None else 100 * v for v in values]
        ax.bar(x + (k - (len(methods) - 1) / 2) * width, heights, width, label=name, color=colours[name])
    ax.set_xticks(x, groups, rotation=20)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _figure_bytes(fig)


# Line styles for a series drawn on top of an identical one: the later one dotted and with
# hollow markers, so both stay visible.
_SAME_STYLE = {"linestyle": ":", "marker": "s", "markerfacecolor": "none", "markersize": 9, "linewidth": 2.5}


def plot_miou_per_stage(report: dict[str, Any]) -> bytes:
    """``figure_miou_per_stage`` as PNG bytes."""
    return _figure_bytes(figure_miou_per_stage(report))


def figure_miou_per_stage(report: dict[str, Any]):
    """mIoU after each stage of the staged methods; the baselines as horizontal lines.

    Every method has its own colour; a series identical to another is drawn dotted over it
    and labelled ``(= other)``. The y-axis is zoomed to the values, and its label says
    where it starts when that is not 0.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colours = method_colours(report)
    staged = {n: m for n, m in report["methods"].items() if "stages" in m}
    lines = {n: [None if st["miou"] is None else 100 * st["miou"] for st in m["stages"]]
             for n, m in staged.items()}
    flat = {n: [None if m["miou"] is None else 100 * m["miou"]]
            for n, m in report["methods"].items() if n not in staged}
    same = {**identical_to(lines), **identical_to(flat)}
    for name, ys in lines.items():
        xs = [st["stage"] for st in staged[name]["stages"]]
        style = _SAME_STYLE if name in same else {"marker": "o"}
        label = f"{name} (= {same[name]})" if name in same else name
        ax.plot(xs, ys, color=colours[name], label=label, **style)
        ax.set_xticks(xs, ["x".join(map(str, st["size"])) for st in staged[name]["stages"]])
    for name, (v,) in flat.items():
        if v is not None:
            label = f"{name} (baseline" + (f", = {same[name]})" if name in same else ")")
            ax.axhline(v, color=colours[name], linestyle=":" if name in same else "--",
                       linewidth=2.5 if name in same else 1.5, label=label)
    values = [v for ys in [*lines.values(), *flat.values()] for v in ys if v is not None]
    if values:
        lo, hi = min(values), max(values)
        margin = max(2.0, 0.1 * (hi - lo))
        bottom = max(0.0, 5 * math.floor((lo - margin) / 5))
        ax.set_ylim(bottom, min(100.0, hi + margin))
        ax.set_ylabel("mIoU (%)" + (f", axis starts at {bottom:g}" if bottom > 0 else ""))
    else:
        ax.set_ylabel("mIoU (%)")
    ax.set_xlabel("stage (size)")
    ax.set_title("mIoU after each stage")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def colorize(labels: np.ndarray, classes: Sequence[ClassSpec]) -> np.ndarray:
    """``(h, w)`` class ids -> ``(h, w, 3)`` uint8 with the classes' colours (others grey)."""
    palette = np.full((256, 3), 128, dtype=np.uint8)
    for c in classes:
        palette[c.id] = c.color
    return palette[labels]


SAMPLE_COLUMNS = 5  # at most this many panels per row of a sample plot


def plot_sample(sample: Sample, classes: Sequence[ClassSpec]) -> bytes:
    """``figure_sample`` as PNG bytes."""
    return _figure_bytes(figure_sample(sample, classes))


def figure_sample(sample: Sample, classes: Sequence[ClassSpec]):
    """Image, ground truth, each method's prediction, uncertainty (with its colour bar) and
    refined pixels per stage, at most ``SAMPLE_COLUMNS`` panels per row (rows filled evenly);
    a legend of the classes and of the refined masks."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    panels: list[tuple[str, np.ndarray, dict]] = [
        ("image", sample.image, {}),
        ("ground truth", colorize(sample.truth, classes), {}),
    ]
    panels += [(name, colorize(pred, classes), {}) for name, pred in sample.predictions.items()]
    panels.append(("uncertainty (progressive)", sample.uncertainty, {"cmap": "magma", "vmin": 0, "vmax": 1}))
    panels += [(f"refined at stage {k + 1}", mask, {"cmap": "gray", "vmin": 0, "vmax": 1})
               for k, mask in enumerate(sample.refined)]
    rows = math.ceil(len(panels) / SAMPLE_COLUMNS)
    cols = math.ceil(len(panels) / rows)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.7 * rows + 0.9), squeeze=False,
                             layout="constrained")
    for ax, (title, data, kw) in zip(axes.flat, panels):
        shown = ax.imshow(data, interpolation="nearest", **kw)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])  # keep the frame: white (barren) must not melt into the page
        ax.set_yticks([])
        if title.startswith("uncertainty"):
            # Under the panel: beside it, the colour bar would widen its whole column.
            cax = ax.inset_axes([0.05, -0.09, 0.9, 0.05])
            bar = fig.colorbar(shown, cax=cax, orientation="horizontal", ticks=[0, 0.5, 1])
            bar.ax.tick_params(labelsize=7)
            bar.ax.set_xlabel("1 - certainty", fontsize=7, labelpad=1)
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    handles = [Patch(facecolor=np.asarray(c.color) / 255, edgecolor="k", label=c.name) for c in classes]
    if sample.refined:
        handles += [Patch(facecolor="white", edgecolor="k", label="refined (R's label)"),
                    Patch(facecolor="black", edgecolor="k", label="kept (coarser stage)")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize=7,
               frameon=False)
    fig.suptitle(f"scene {sample.id}", fontsize=9)
    return fig


def confusion_method(report: dict[str, Any]) -> str:
    """The method the confusion-matrix plot shows: progressive, else the first."""
    return "progressive" if "progressive" in report["methods"] else next(iter(report["methods"]))


def plot_confusion(report: dict[str, Any]) -> bytes:
    """``figure_confusion`` as PNG bytes."""
    return _figure_bytes(figure_confusion(report))


def figure_confusion(report: dict[str, Any]):
    """The confusion matrix of ``confusion_method`` normalised by ground truth: row k is
    where the pixels of class k went (the diagonal is producer's accuracy), in %."""
    plt = _pyplot()
    name = confusion_method(report)
    matrix = np.asarray(report["methods"][name]["confusion_matrix"], dtype=np.float64)
    names = [c["name"] for c in report["classes"]]
    keep = matrix.sum(1) > 0  # classes with ground truth pixels (rows); all columns
    rows = 100 * matrix[keep] / matrix[keep].sum(1, keepdims=True)
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * n, 0.9 + 0.6 * max(int(keep.sum()), 1)))
    shown = ax.imshow(rows, cmap="Blues", vmin=0, vmax=100, aspect="auto")
    for (i, j), v in np.ndenumerate(rows):
        ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8,
                color="white" if v > 60 else "black")
    ax.set_xticks(range(n), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(int(keep.sum())), [m for m, k in zip(names, keep) if k], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(f"{name}: confusion matrix, % of each ground-truth class", fontsize=9)
    fig.colorbar(shown, ax=ax, label="% of the row")
    return fig


# --------------------------------------------------------------------------- files


def report_paths(out_dir: str | Path) -> list[Path]:
    """The report files a run always writes in ``out_dir`` (the sample panels vary with the
    data): checked before a run starts."""
    out_dir = Path(out_dir)
    return [out_dir / REPORT_JSON, out_dir / REPORT_MD]


def check_outputs(out_dir: str | Path, overwrite: bool) -> None:
    """Raise before any work if a report is already there and ``overwrite`` is false."""
    existing = [p for p in report_paths(out_dir) if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(
            f"{', '.join(map(str, existing))} already exist(s); pass --overwrite to replace, "
            "or choose another --out-dir"
        )


def write_report(
    out_dir: str | Path,
    report: dict[str, Any],
    samples: Sequence[Sample],
    classes: Sequence[ClassSpec],
    overwrite: bool = False,
) -> list[Path]:
    """Write plots, then ``report.md``, then ``report.json`` (last: its presence means the
    run finished). Every file is written atomically. Returns the paths written."""
    out_dir = Path(out_dir)
    check_outputs(out_dir, overwrite)
    (out_dir / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    files: list[tuple[Path, bytes]] = [(out_dir / PLOT_IOU, plot_per_class_iou(report)),
                                       (out_dir / PLOT_CONFUSION, plot_confusion(report))]
    if PLOT_BOUNDARY in report["plots"]:
        files.append((out_dir / PLOT_BOUNDARY, plot_per_class_iou(
            report, "boundary_iou", "boundary_miou", "Per-class boundary IoU by method")))
    if PLOT_STAGES in report["plots"]:
        files.append((out_dir / PLOT_STAGES, plot_miou_per_stage(report)))
    if PLOT_RELIABILITY in report["plots"]:
        files.append((out_dir / PLOT_RELIABILITY, _figure_bytes(reliability_figure(report, _pyplot()))))
    files += [(out_dir / sample_plot_name(s.id), plot_sample(s, classes)) for s in samples]
    files.append((out_dir / REPORT_MD, render_markdown(report).encode()))
    files.append((out_dir / REPORT_JSON, (json.dumps(report, indent=2) + "\n").encode()))
    for path, data in files:
        with atomic_write(path, overwrite=True) as tmp:
            tmp.write_bytes(data)
    return [p for p, _ in files]

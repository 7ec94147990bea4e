"""The benchmark's outputs: ``report.json``, ``report.md`` and plots (matplotlib, Agg).

``build_report`` turns a ``BenchmarkResult`` into one plain dict (the JSON file);
``render_markdown`` and the plots are made from that dict and the kept samples only, so the
files always agree with each other. ``write_report`` writes everything atomically.
"""

from __future__ import annotations

import dataclasses
import io
import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from magseg.config import ClassSpec, Config
from magseg.engine.precision import runtime_info
from magseg.errors import OutputExistsError
from magseg.evaluation.benchmark import NO_REFINER, BenchmarkResult, Sample, method_summary
from magseg.evaluation.reliability import PLOT_RELIABILITY, calibration_markdown, reliability_figure
from magseg.io.atomic import atomic_write

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_IOU = "per_class_iou.png"
PLOT_STAGES = "miou_per_stage.png"
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
    methods = {name: method_summary(t, config) for name, t in result.tallies.items()}
    how = next((t.memory_how for t in result.tallies.values()), "VmHWM")
    plots = [PLOT_IOU]
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
        "failed": result.failed,
        "complete": not result.failed,
        "classes": [{"id": c.id, "name": c.name, "in_mean": c.in_mean} for c in config.classes],
        "config": _config_summary(config),
        "environment": _environment(config),
        "measurement": {"time": TIME_NOTE, "memory": MEMORY_NOTE[how],
                        "miou": "one confusion matrix per method summed over the split; mean over "
                                "the classes with in_mean (DeepGlobe: 'unknown' is counted in the "
                                "matrix but left out of the mean)"},
        "methods": methods,
        "margins_miou_points": _margins(methods),
        "refiner_gain_points": _refiner_gain(methods),
        "plots": plots,
        "per_image": [
            {"id": r.id, "size": list(r.size), "methods": r.methods} for r in result.images
        ],
    }
    return report


def _points(a: float | None, b: float | None) -> float | None:
    """``a - b`` in percentage points; None when either is undefined."""
    return None if a is None or b is None else 100 * (a - b)


def _margins(methods: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Progressive's mIoU minus each baseline's, in points."""
    if "progressive" not in methods:
        return {}
    return {f"progressive_minus_{base}": _points(methods["progressive"]["miou"], methods[base]["miou"])
            for base in ("downsample", "patch") if base in methods}


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
                    "input": list(config.pyramid.input), "scene": list(config.pyramid.scene)},
        "refine": {"points": config.refine.points, "kernel": config.refine.kernel},
        "engine": {"batch_size": config.engine.batch_size, "device": config.engine.device,
                   "precision": config.engine.precision},
    }


def _environment(config: Config) -> dict[str, Any]:
    """The device, resolved precision, CPU model and its bf16/AMX support, and the software."""
    return {
        **runtime_info(config.engine.device, config.engine.precision),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


# --------------------------------------------------------------------------- markdown


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _machine(env: dict[str, Any]) -> str:
    """``device cpu, precision bf16 (AMD EPYC, AVX512, native bf16, 2 threads)``."""
    cpu = env.get("cpu") or {}
    native = [name for name, key in (("native bf16", "avx512_bf16"), ("AMX", "amx")) if cpu.get(key)]
    where = ", ".join([cpu.get("model", "?"), cpu.get("capability", "?"), *native,
                       f"{env['torch_threads']} threads"])
    gpu = f", GPU {env['gpu']}" if env.get("gpu") else ""
    return f"device {env['device']}{gpu}, precision {env.get('precision', '?')} ({where})"


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the methods table, the stages table, the margins and the plots."""
    counted = [c["name"] for c in report["classes"] if c["in_mean"]]
    lines = [
        f"# magseg benchmark: {report['split']} split of {report['data_root']}",
        "",
        f"Checkpoint `{report['checkpoint']}`, {report['images']} image(s), "
        f"pyramid {' -> '.join('x'.join(map(str, s)) for s in report['config']['pyramid']['scales'])}, "
        f"crop {'x'.join(map(str, report['config']['pyramid']['crop']))}, "
        f"K = {report['config']['refine']['points']}, {_machine(report['environment'])}.",
        "",
    ]
    if report["failed"]:
        lines += [f"**Incomplete: {len(report['failed'])} image(s) failed** (scores are over the others):", ""]
        lines += [f"- `{f['id']}`: {f['error']}" for f in report["failed"]] + [""]
    header = ["method", "mIoU", *counted, "OA", "FWIoU", "s/image", "peak MB"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in report["methods"].items():
        row = [name, f"**{_pct(m['miou'])}**", *(_pct(m["iou"][c]) for c in counted),
               _pct(m["accuracy"]), _pct(m["fwiou"]),
               "n/a" if m["seconds_per_image"] is None else f"{m['seconds_per_image']:.2f}",
               f"{m['peak_memory_mb']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("IoU and accuracy in %. " + " ".join(
        f"`{n}`: {m['description']}." for n, m in report["methods"].items()))
    lines.append("")
    for name, m in report["methods"].items():
        if "stages" not in m:
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
    if report["margins_miou_points"]:
        lines += ["## Margins", ""]
        lines += [f"- {k.replace('_', ' ')}: {v:+.1f} mIoU points" if v is not None else f"- {k}: n/a"
                  for k, v in report["margins_miou_points"].items()]
        lines.append("")
    gain = report.get("refiner_gain_points")
    if gain is not None:
        per_class = ", ".join(f"{c} {v:+.1f}" for c, v in gain["iou"].items() if v is not None and c in counted)
        lines += ["## What the refiner adds", "",
                  f"`progressive` minus `{NO_REFINER}`: "
                  + ("n/a" if gain["miou"] is None else f"{gain['miou']:+.1f} mIoU points")
                  + (f"; IoU points per class: {per_class}." if per_class else "."), ""]
    lines += calibration_markdown(report)
    lines += ["## How this was measured", "",
              f"- mIoU: {report['measurement']['miou']}.",
              f"- Time: {report['measurement']['time']}.",
              f"- Memory: {report['measurement']['memory']}.", ""]
    if report.get("command"):
        lines += ["Command:", "", "    " + " ".join(report["command"]), ""]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]] + [""]
    return "\n".join(lines)


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


def plot_per_class_iou(report: dict[str, Any]) -> bytes:
    """Grouped bars: IoU of every counted class (and mIoU) for every method."""
    plt = _pyplot()
    counted = [c["name"] for c in report["classes"] if c["in_mean"]]
    groups = [*counted, "mIoU"]
    methods = list(report["methods"])
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(groups) * max(1, len(methods)) / 2), 4))
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(groups))
    for k, name in enumerate(methods):
        m = report["methods"][name]
        values = [m["iou"][c] for c in counted] + [m["miou"]]
        heights = [0 if v is None else 100 * v for v in values]
        ax.bar(x + (k - (len(methods) - 1) / 2) * width, heights, width, label=name)
    ax.set_xticks(x, groups, rotation=20)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Per-class IoU by method")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _figure_bytes(fig)


def plot_miou_per_stage(report: dict[str, Any]) -> bytes:
    """mIoU after each stage of the staged methods; the baselines as horizontal lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in report["methods"].items():
        if "stages" in m:
            xs = [st["stage"] for st in m["stages"]]
            ys = [None if st["miou"] is None else 100 * st["miou"] for st in m["stages"]]
            ax.plot(xs, ys, marker="o", label=name)
            ax.set_xticks(xs, ["x".join(map(str, st["size"])) for st in m["stages"]])
    for k, name in enumerate(n for n, m in report["methods"].items() if "stages" not in m):
        v = report["methods"][name]["miou"]
        if v is not None:
            ax.axhline(100 * v, linestyle="--", color=f"C{k + 3}", label=f"{name} (baseline)")
    ax.set_xlabel("stage (size)")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("mIoU after each stage")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _figure_bytes(fig)


def colorize(labels: np.ndarray, classes: Sequence[ClassSpec]) -> np.ndarray:
    """``(h, w)`` class ids -> ``(h, w, 3)`` uint8 with the classes' colours (others grey)."""
    palette = np.full((256, 3), 128, dtype=np.uint8)
    for c in classes:
        palette[c.id] = c.color
    return palette[labels]


def plot_sample(sample: Sample, classes: Sequence[ClassSpec]) -> bytes:
    """One row: image, ground truth, each method's prediction, uncertainty, refined pixels per
    stage."""
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
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.0))
    for ax, (title, data, kw) in zip(np.atleast_1d(axes), panels):
        ax.imshow(data, interpolation="nearest", **kw)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])  # keep the frame: white (barren) must not melt into the page
        ax.set_yticks([])
    handles = [Patch(facecolor=np.asarray(c.color) / 255, edgecolor="k", label=c.name) for c in classes]
    fig.legend(handles=handles, loc="lower center", ncol=len(classes), fontsize=7, frameon=False)
    fig.suptitle(f"scene {sample.id}", fontsize=9)
    return _figure_bytes(fig)


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
    files: list[tuple[Path, bytes]] = [(out_dir / PLOT_IOU, plot_per_class_iou(report))]
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

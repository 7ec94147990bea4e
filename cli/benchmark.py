"""``magseg benchmark``: progressive refinement against downsample-only and patch-only."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from magseg.cli.app import Command, app
from magseg.cli.common import (
    ADAPTIVE_MAX_CROPS,
    ADAPTIVE_THRESHOLD,
    BATCH_SIZE,
    DATA_ROOT,
    DEVICE,
    EXIT_FAILED,
    OVERWRITE,
    QUIET,
    RAY_ADDRESS,
    REMOVED_ENGINE,
    RUNNER,
    SETTINGS,
    TTA,
    WORKERS,
    Runner,
    check_checkpoint,
    check_device,
    config_overrides,
    emit,
    examples,
    handle_errors,
    load_model,
    log,
    out_dir_option,
    progress_bar,
    refuse_positional_arguments,
    removed_option,
)
from magseg.config import LAYOUTS

if TYPE_CHECKING:
    from magseg.cli.common import Model
    from magseg.data.scenes import Scene
    from magseg.evaluation.benchmark import BenchmarkResult, FailedScene, ImageRecord, Method

# --layout's choices: the layouts the config schema knows (magseg.config.LAYOUTS).
Layout = Enum("Layout", {name: name for name in LAYOUTS}, type=str)  # type: ignore[misc]


def _fractions(text: str | None) -> tuple[float, ...]:
    if text is None:
        return ()
    try:
        ks = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        ks = ()
    if not ks or any(not 0 < k <= 1 for k in ks):
        raise typer.BadParameter(f"{text!r}: give fractions in (0, 1], e.g. 0.5,0.75,1.0",
                                 param_hint="--sweep-k")
    return ks


# benchmark's own options (the shared ones come from magseg.cli.common).
CHECKPOINT = typer.Argument(..., metavar="CHECKPOINT", help="Checkpoint written by `magseg train`.")
OUT_DIR = out_dir_option("report.json, report.md and the plots")
SPLIT = typer.Option("test", metavar="SPLIT", help="Split to score: train, val, test, or a path to a list of ids.")
LAYOUT = typer.Option(
    None, metavar="|".join(LAYOUTS), help="Data layout; sets data.layout (default: the checkpoint's).")
REMOVED_ADAPTIVE = removed_option(
    "--adaptive", "--adaptive went away: the 'adaptive' row is scored whenever engine.adaptive is "
    "set (by the checkpoint, --adaptive-threshold X, --adaptive-max-crops N or --set "
    "engine.adaptive.*); drop --adaptive", flag=True)
SWEEP_K = typer.Option(
    None, "--sweep-k", metavar="K,K,...", help="Also score progressive at each of these K (fractions of a crop's "
    "pixels), e.g. 0.5,0.75,1.0: one row 'progressive (K=...)' each.")
CRF = typer.Option(
    False, "--crf", help="Add rows 'progressive + CRF' and 'patch + CRF': the checkpoint's refine.crf "
    "settings (DeepLab's by default; change them with --set refine.crf.KEY=VALUE), switched on.")
LIMIT = typer.Option(None, min=1, metavar="N", help="Only the first N scenes of the split.")
SAMPLES = typer.Option(3, min=0, metavar="N", help="Sample panels to draw (the first N scenes).")
WARMUP = typer.Option(True, help="Run every method once on the first scene, untimed, before measuring.")


@app.command(
    cls=Command,
    context_settings={"allow_extra_args": True},  # see refuse_positional_arguments
    epilog=examples([
        "magseg benchmark runs/dg/best.ckpt --data-root /data/deepglobe --split test -o bench/",
        "magseg benchmark runs/demo/best.ckpt --data-root data/synthetic -o bench/ --adaptive-max-crops 4 "
        "--limit 20",
        "magseg benchmark model.ckpt --data-root data/ -o bench/ --set refine.points=0.5 --device cuda "
        "--batch-size 16 | jq .methods",
        "magseg benchmark model.ckpt --data-root /shared/data/ -o bench/ --runner ray --ray-address auto",
    ]),
)
@handle_errors
def benchmark(
    ctx: typer.Context,
    checkpoint: Path = CHECKPOINT,
    data_root: Path = DATA_ROOT,
    out_dir: Path = OUT_DIR,
    split: str = SPLIT,
    layout: Layout = LAYOUT,
    adaptive_threshold: float = ADAPTIVE_THRESHOLD,
    adaptive_max_crops: int = ADAPTIVE_MAX_CROPS,
    sweep_k: str = SWEEP_K,
    crf: bool = CRF,
    limit: int = LIMIT,
    samples: int = SAMPLES,
    warmup: bool = WARMUP,
    device: str = DEVICE,
    batch_size: int = BATCH_SIZE,
    tta: str = TTA,
    settings: list[str] = SETTINGS,
    overwrite: bool = OVERWRITE,
    runner: Runner = RUNNER,
    ray_address: str = RAY_ADDRESS,
    workers: int = WORKERS,
    quiet: bool = QUIET,
    old_engine: str = REMOVED_ENGINE,
    old_adaptive: bool = REMOVED_ADAPTIVE,
) -> None:
    """Score the progressive method and its two baselines on a labelled split.

    Runs, with the checkpoint's backbone: the full progressive method (and its mIoU after
    every stage), downsample-only (the stage-0 view upsampled) and patch-only (finest scale,
    crops stitched, no context); the adaptive mode when engine.adaptive is set (the
    checkpoint's, or --adaptive-threshold, --adaptive-max-crops), and progressive and
    patch-only with the CRF (--crf). Writes report.json, report.md, per_class_iou.png,
    confusion_matrix.png, per_class_boundary_iou.png, miou_per_stage.png and samples/<id>.png
    to --out-dir. stdout: one JSON
    line per image, then one summary line. Exit 1 if any image failed (the others are still
    scored, and the report says which failed) or the data is bad; exit 2 when the run cannot
    start as asked (bad option, config, device or checkpoint). With --runner ray, the scenes
    run on Ray actors and their confusion matrices are summed.
    """
    refuse_positional_arguments(ctx)
    check_checkpoint(checkpoint, settings)  # before torch is imported: a missing file costs nothing
    check_device(device)

    from magseg.data.scenes import list_scenes
    from magseg.evaluation.benchmark import benchmark_methods, check_scenes
    from magseg.evaluation.reliability import training_choice
    from magseg.evaluation.report import build_report, check_outputs, write_report

    check_outputs(out_dir, overwrite)
    model = load_model(runner, checkpoint, config_overrides(settings, {
        "data.layout": None if layout is None else layout.value, "engine.device": device,
        "engine.batch_size": batch_size, "engine.tta": tta,
        "engine.adaptive.threshold": adaptive_threshold, "engine.adaptive.max_crops": adaptive_max_crops}),
        quiet, checked=True)
    config = model.config
    methods = benchmark_methods(config, _fractions(sweep_k), crf)
    data_root = data_root if data_root is not None else Path(config.data.root or ".")
    scenes = list_scenes(config.data, split, data_root)[:limit]
    check_scenes(scenes, config)
    log(f"benchmark: {len(scenes)} scene(s) of split {split!r}, methods: "
        + ", ".join(m.name for m in methods), quiet)

    result, failures = _score(model, scenes, methods, samples=samples, warmup=warmup,
                              workers=workers, address=ray_address, quiet=quiet)
    report = build_report(result, checkpoint=checkpoint, data_root=data_root, split=split,
                          command=["magseg", *sys.argv[1:]])
    report["training_choice"] = training_choice(model.loaded)
    write_report(out_dir, report, result.samples, config.classes, overwrite=overwrite)
    _summarise(report, out_dir, failures, quiet)


def _score(model: Model, scenes: list[Scene], methods: list[Method], *, samples: int, warmup: bool,
           workers: int | None, address: str | None, quiet: bool) -> tuple[BenchmarkResult, list[str]]:
    """Run ``methods`` on ``scenes`` where the runner puts them (``workers``, ``address``:
    --workers, --ray-address); one NDJSON line per image. Returns the BenchmarkResult and the
    ids of the failed images."""
    from magseg.run.benchmark import run_benchmark

    failures: list[str] = []

    def on_failure(failed: FailedScene) -> None:
        failures.append(failed.id)
        log(f"magseg: error: {failed.error}")

    with model.pool(workers, address, quiet) as pool, \
            progress_bar(len(scenes), "benchmark", quiet, unit="scene") as bar:
        def on_image(record: ImageRecord) -> None:
            bar.update(1)
            emit({"id": record.id, "size": list(record.size), "methods": record.methods})

        result = run_benchmark(pool, model.config, scenes, methods, samples=samples,
                               warmup=warmup, checkpoint=model.checkpoint, on_image=on_image,
                               on_failure=on_failure)
    return result, failures


def _summarise(report: dict, out_dir: Path, failures: list[str], quiet: bool) -> None:
    """The summary line on stdout, a table and the report's paths on stderr; exit 1 if any
    image failed."""
    from magseg.evaluation.report import REPORT_JSON

    emit({
        "summary": True,
        "report": str(out_dir / REPORT_JSON),
        "images": report["images"],
        "failed": [f["id"] for f in report["failed"]],
        "methods": {n: {"miou": m["miou"], "seconds_per_image": m["seconds_per_image"],
                        "peak_memory_mb": m["peak_memory_mb"]} for n, m in report["methods"].items()},
        "margins_miou_points": report["margins_miou_points"],
    })
    from magseg.evaluation.metrics import percent

    for name, m in report["methods"].items():
        log(f"  {name:12s} mIoU {percent(m['miou']):>6s}  {m['seconds_per_image']:.2f} s/image", quiet)
    log(f"report: {out_dir / REPORT_JSON}, {out_dir / 'report.md'}", quiet)
    if failures:
        log(f"magseg: {len(failures)} image(s) failed: {', '.join(failures)}", quiet)
        raise typer.Exit(EXIT_FAILED)

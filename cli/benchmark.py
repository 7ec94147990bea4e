"""``magseg benchmark``: progressive refinement against downsample-only and patch-only."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from magseg.cli.app import Command, app
from magseg.cli.common import (
    BATCH_SIZE,
    DEVICE,
    EXIT_FAILED,
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
    overwrite_option,
    progress_bar,
)


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
DATA_ROOT = typer.Argument(
    ..., metavar="DATA_ROOT", help="Dataset root (DeepGlobe layout, or GeoTIFF pairs: images/, masks/).")
OUT_DIR = out_dir_option("report.json, report.md and the plots")
SPLIT = typer.Option("test", metavar="SPLIT", help="Split to score: train, val, test, or a path to a list of ids.")
LAYOUT = typer.Option(
    None, metavar="deepglobe|geotiff", help="Data layout: deepglobe or geotiff; sets data.layout (default: the checkpoint's).")
ADAPTIVE = typer.Option(
    False, "--adaptive", help="Add an 'adaptive' row with the checkpoint's engine.adaptive settings.")
ADAPTIVE_THRESHOLD = typer.Option(
    None, metavar="X", help="Add an 'adaptive' row: skip crops whose mean coarse uncertainty is below this.")
ADAPTIVE_MAX_CROPS = typer.Option(
    None, metavar="N", help="Add an 'adaptive' row: run only the N most uncertain crops of each stage.")
SWEEP_K = typer.Option(
    None, "--sweep-k", metavar="K,K,...", help="Also score progressive at each of these K (fractions of a crop's "
    "pixels), e.g. 0.5,0.75,1.0: one row 'progressive (K=...)' each.")
CRF = typer.Option(
    False, "--crf", help="Add rows 'progressive + CRF' and 'patch + CRF': the checkpoint's refine.crf "
    "settings (DeepLab's by default; change them with --set refine.crf.KEY=VALUE), switched on.")
LIMIT = typer.Option(None, min=1, metavar="N", help="Only the first N scenes of the split.")
SAMPLES = typer.Option(3, min=0, metavar="N", help="Sample panels to draw (the first N scenes).")
WARMUP = typer.Option(True, help="Run every method once on the first scene, untimed, before measuring.")
OVERWRITE = overwrite_option("an existing report in --out-dir")


@app.command(cls=Command, epilog=examples([
    "magseg benchmark runs/dg/best.ckpt /data/deepglobe --split test -o bench/",
    "magseg benchmark runs/demo/best.ckpt data/synthetic -o bench/ --adaptive-max-crops 4 --limit 20",
    "magseg benchmark model.ckpt data/ -o bench/ --set refine.points=0.5 --device cuda "
    "--batch-size 16 | jq .methods",
    "magseg benchmark model.ckpt /shared/data/ -o bench/ --runner ray --ray-address auto",
]))
@handle_errors
def benchmark(
    checkpoint: Path = CHECKPOINT,
    data_root: Path = DATA_ROOT,
    out_dir: Path = OUT_DIR,
    split: str = SPLIT,
    layout: str = LAYOUT,
    adaptive: bool = ADAPTIVE,
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
) -> None:
    """Score the progressive method and its two baselines on a labelled split.

    Runs, with the checkpoint's backbone: the full progressive method (and its mIoU after
    every stage), downsample-only (the stage-0 view upsampled) and patch-only (finest scale,
    crops stitched, no context); optionally the adaptive mode, and progressive and patch-only
    with the CRF (--crf). Writes report.json, report.md, per_class_iou.png,
    confusion_matrix.png, per_class_boundary_iou.png, miou_per_stage.png and samples/<id>.png
    to --out-dir. stdout: one JSON
    line per image, then one summary line. Exit 1 if any image failed (the others are still
    scored, and the report says which failed) or the data is bad; exit 2 when the run cannot
    start as asked (bad option, config, device or checkpoint). With --runner ray, the scenes
    run on Ray actors and their confusion matrices are summed.
    """
    from magseg.errors import ConfigError

    check_checkpoint(checkpoint, settings)  # before torch is imported: a missing file costs nothing
    if layout is not None and layout not in ("deepglobe", "geotiff"):
        raise ConfigError(f"--layout {layout!r}: use deepglobe or geotiff")
    check_device(device)

    from magseg.data.scenes import list_scenes
    from magseg.evaluation.benchmark import benchmark_methods, check_scenes
    from magseg.evaluation.reliability import training_choice
    from magseg.evaluation.report import build_report, check_outputs, write_report

    check_outputs(out_dir, overwrite)
    model = load_model(runner, checkpoint, config_overrides(settings, {
        "data.layout": layout, "engine.device": device, "engine.batch_size": batch_size,
        "engine.tta": tta}), quiet)
    config = model.config
    wanted = _adaptive_row(config, checkpoint, adaptive, adaptive_threshold, adaptive_max_crops)
    methods = benchmark_methods(config, wanted, _fractions(sweep_k), crf)
    scenes = list_scenes(config.data, split, data_root)[:limit]
    check_scenes(scenes, config)
    log(f"benchmark: {len(scenes)} scene(s) of split {split!r}, methods: "
        + ", ".join(m.name for m in methods), quiet)

    result, failures = _score(model, scenes, methods, samples=samples, warmup=warmup,
                              workers=workers, address=ray_address, quiet=quiet)
    report = build_report(result, checkpoint=checkpoint, data_root=data_root, split=split,
                          command=["magseg", *sys.argv[1:]])
    report["training_choice"] = training_choice(checkpoint)
    write_report(out_dir, report, result.samples, config.classes, overwrite=overwrite)
    _summarise(report, out_dir, failures, quiet)


def _score(model, scenes, methods, *, samples: int, warmup: bool, workers: int | None,
           address: str | None, quiet: bool):
    """Run ``methods`` on ``scenes`` where the runner puts them (``workers``, ``address``:
    --workers, --ray-address); one NDJSON line per image. Returns the BenchmarkResult and the ids of the failed images."""
    from magseg.evaluation.benchmark import run_benchmark

    failures: list[str] = []

    def on_failure(scene, error: str) -> None:
        failures.append(scene.id)
        log(f"magseg: error: {error}")

    with model.pool(workers, address, quiet) as pool, \
            progress_bar(len(scenes), "benchmark", quiet, unit="scene") as bar:
        def on_image(record) -> None:
            bar.update(1)
            emit({"id": record.id, "size": list(record.size), "methods": record.methods})

        result = run_benchmark(pool, model.config, scenes, methods, samples=samples,
                               warmup=warmup, checkpoint=model.checkpoint, on_image=on_image,
                               on_failure=on_failure)
    return result, failures


def _adaptive_row(config, checkpoint: Path, adaptive: bool, threshold: float | None,
                  max_crops: int | None):
    """The engine.adaptive settings of the 'adaptive' row, or None for no such row."""
    from magseg.errors import ConfigError

    if threshold is not None or max_crops is not None:
        # Through the config schema, so these flags are checked as --set values are.
        return config.override({"engine.adaptive.threshold": threshold,
                                "engine.adaptive.max_crops": max_crops}).engine.adaptive
    if not adaptive:
        return None
    if not config.engine.adaptive.enabled:
        raise ConfigError(f"--adaptive: the checkpoint {checkpoint} sets no engine.adaptive; give "
                          "--adaptive-threshold and/or --adaptive-max-crops")
    return config.engine.adaptive


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

"""``magseg benchmark``: progressive refinement against downsample-only and patch-only."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from magseg.cli.app import app
from magseg.cli.common import EXIT_FAILED, check_device, emit, handle_errors, log, progress_bar


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


@app.command(
    epilog=(
        "Examples:\n\n"
        "  magseg benchmark runs/dg/best.ckpt /data/deepglobe --split test --out-dir bench/\n\n"
        "  magseg benchmark runs/demo/best.ckpt data/synthetic --out-dir bench/ "
        "--adaptive-max-crops 4 --limit 20\n\n"
        "  magseg benchmark model.ckpt data/ --out-dir bench/ --set refine.points=0.5 "
        "--device cuda --batch-size 16 | jq .methods"
    )
)
@handle_errors
def benchmark(
    checkpoint: Path = typer.Argument(..., help="Checkpoint written by `magseg train`."),
    data_root: Path = typer.Argument(..., help="Dataset root (DeepGlobe layout, or GeoTIFF pairs: images/, masks/)."),
    out_dir: Path = typer.Option(..., "--out-dir", "-o", help="Where report.json, report.md and the plots go."),
    split: str = typer.Option("test", help="Split to score: train, val, test, or a path to a list of ids."),
    layout: str = typer.Option(None, help="Data layout: deepglobe or geotiff (default: the checkpoint's)."),
    adaptive: bool = typer.Option(
        False, "--adaptive", help="Add an 'adaptive' row with the checkpoint's engine.adaptive settings."
    ),
    adaptive_threshold: float = typer.Option(
        None, help="Add an 'adaptive' row: skip crops whose mean coarse uncertainty is below this."
    ),
    adaptive_max_crops: int = typer.Option(
        None, help="Add an 'adaptive' row: run only the N most uncertain crops of each stage."
    ),
    sweep_k: str = typer.Option(
        None, "--sweep-k", help="Also score progressive at each of these K (fractions of a crop's "
        "pixels), e.g. 0.5,0.75,1.0: one row 'progressive (K=...)' each."),
    limit: int = typer.Option(None, min=1, help="Only the first N scenes of the split."),
    samples: int = typer.Option(3, min=0, help="Sample panels to draw (the first N scenes)."),
    warmup: bool = typer.Option(
        True, help="Run every method once on the first scene, untimed, before measuring."
    ),
    device: str = typer.Option(None, help="cpu or cuda (default: the checkpoint's engine.device)."),
    batch_size: int = typer.Option(None, min=1, help="Crops per backbone batch."),
    set_: list[str] = typer.Option(
        [], "--set", help="Run-time override key=value (e.g. refine.points=0.5); repeatable."
    ),
    overwrite: bool = typer.Option(False, help="Replace an existing report in --out-dir."),
    engine: str = typer.Option(
        "local", "--engine", help="local: this process; ray: scenes on Ray actors that each load "
        "the model once, confusion matrices summed (pip install 'magseg[ray]')."),
    ray_address: str = typer.Option(
        None, "--ray-address", help="With --engine ray: a cluster to join (e.g. auto); default: "
        "a local Ray instance."),
    workers: int = typer.Option(None, "--workers", min=1, help="With --engine ray: number of actors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or log lines on stderr."),
) -> None:
    """Score the progressive method and its two baselines on a labelled split.

    Runs, with the checkpoint's backbone: the full progressive method (and its mIoU after
    every stage), downsample-only (the stage-0 view upsampled) and patch-only (finest scale,
    crops stitched, no context); optionally the adaptive mode. Writes report.json, report.md,
    per_class_iou.png, miou_per_stage.png and samples/<id>.png to --out-dir. stdout: one JSON
    line per image, then one summary line. Exit 1 if any image failed (the others are still
    scored, and the report says which failed) or the data is bad; exit 2 when the run cannot
    start as asked (bad option, config, device or checkpoint).
    """
    from magseg.checkpoint import load_checkpoint
    from magseg.data.scenes import list_scenes
    from magseg.errors import ConfigError
    from magseg.evaluation.benchmark import benchmark_methods, check_scenes, run_benchmark
    from magseg.evaluation.report import REPORT_JSON, build_report, check_outputs, write_report
    from magseg.segmenter import Segmenter

    check_device(device)
    check_outputs(out_dir, overwrite)
    if engine not in ("local", "ray"):
        raise ConfigError(f"--engine {engine!r}: use local or ray")
    overrides = list(set_)
    if layout is not None:
        if layout not in ("deepglobe", "geotiff"):
            raise ConfigError(f"--layout {layout!r}: use deepglobe or geotiff")
        overrides.append(f"data.layout={layout}")
    if device is not None:
        overrides.append(f"engine.device={device}")
    if batch_size is not None:
        overrides.append(f"engine.batch_size={batch_size}")
    ckpt = load_checkpoint(checkpoint)
    if engine == "ray":  # the workers build the models; here only the config is needed
        segmenter = None
        config = ckpt.config.override(overrides)
    else:
        segmenter = Segmenter.from_checkpoint(ckpt, overrides)
        config = segmenter.config

    wanted = None
    if adaptive_threshold is not None or adaptive_max_crops is not None:
        # Through the config schema, so these flags are checked as --set values are.
        wanted = config.override({"engine.adaptive.threshold": adaptive_threshold,
                                  "engine.adaptive.max_crops": adaptive_max_crops}).engine.adaptive
    elif adaptive:
        wanted = config.engine.adaptive
        if not wanted.enabled:
            raise ConfigError(
                f"--adaptive: the checkpoint {checkpoint} sets no engine.adaptive; give "
                "--adaptive-threshold and/or --adaptive-max-crops"
            )
    methods = benchmark_methods(config, wanted, _fractions(sweep_k))

    scenes = list_scenes(config.data, split, data_root)
    if limit is not None:
        scenes = scenes[:limit]
    check_scenes(scenes, config)
    log(f"benchmark: {len(scenes)} scene(s) of split {split!r}, methods: "
        + ", ".join(m.name for m in methods), quiet)

    failures: list[str] = []

    def on_failure(scene, error: str) -> None:
        failures.append(scene.id)
        log(f"magseg: error: {error}")

    from magseg.cluster import LocalPool, ScenePool

    pool = (ScenePool(checkpoint, overrides, workers, ray_address, quiet=quiet) if segmenter is None
            else LocalPool(segmenter))
    with pool, progress_bar(len(scenes), "benchmark", quiet, unit="scene") as bar:
        def on_image(record) -> None:
            bar.update(1)
            emit({"id": record.id, "size": list(record.size), "methods": record.methods})

        result = run_benchmark(pool, config, scenes, methods, samples=samples, warmup=warmup,
                               checkpoint=checkpoint, on_image=on_image, on_failure=on_failure)
    report = build_report(result, checkpoint=checkpoint, data_root=data_root, split=split,
                          command=["magseg", *sys.argv[1:]])
    write_report(out_dir, report, result.samples, config.classes, overwrite=overwrite)
    emit({
        "summary": True,
        "report": str(out_dir / REPORT_JSON),
        "images": report["images"],
        "failed": [f["id"] for f in report["failed"]],
        "methods": {n: {"miou": m["miou"], "seconds_per_image": m["seconds_per_image"],
                        "peak_memory_mb": m["peak_memory_mb"]} for n, m in report["methods"].items()},
        "margins_miou_points": report["margins_miou_points"],
    })
    for name, m in report["methods"].items():
        log(f"  {name:12s} mIoU {100 * (m['miou'] or 0):5.1f}  {m['seconds_per_image']:.2f} s/image", quiet)
    log(f"report: {out_dir / REPORT_JSON}, {out_dir / 'report.md'}", quiet)
    if failures:
        log(f"magseg: {len(failures)} image(s) failed: {', '.join(failures)}", quiet)
        raise typer.Exit(EXIT_FAILED)

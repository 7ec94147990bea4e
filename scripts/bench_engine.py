#!/usr/bin/env python
"""How much the progressive engine costs beside its backbone, on one scene, in one run.

Times, interleaved over ``--repeat`` rounds (median reported):
  (a) backbone: the backbone alone on exactly the crops the engine feeds it, in the same
      batches (recorded from a warm-up run of the engine, replayed);
  (b) engine:   the full progressive method (pyramid, refiner, error map, top-K, stitching);
  (c) patch:    the patch-only sliding window at the finest scale;
  (d) adaptive: the engine in adaptive mode (crops skipped by coarse uncertainty).
Prints the figures and the ratios b/a, b/c and d/b as one JSON object on stdout (and to
--json), plus a paired view of the overhead: the backbone's time measured inside each engine
run (forward hooks), the engine's own seconds beside it and their median ratio. Models come
from --checkpoint, or from the config with random weights (speed does not depend on them);
the scene is --image (any raster magseg reads) or random pixels.

    python scripts/bench_engine.py                                  # 2448^2, Unet-ResNet18
    python scripts/bench_engine.py --arch FPN --encoder resnet50 --repeat 3
    python scripts/bench_engine.py --checkpoint runs/demo/best.ckpt --image scene.tif \\
        --adaptive-threshold 0.1
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from figures import report as report_figures  # noqa: E402

from magseg.allocator import keep_freed_memory  # noqa: E402
from magseg.config import AdaptiveConfig, load_config  # noqa: E402
from magseg.engine.precision import precision_context, resolve_precision  # noqa: E402
from magseg.segmenter import Segmenter  # noqa: E402


def _segmenter(args: argparse.Namespace) -> Segmenter:
    overrides = [f"engine.{k}={v}" for k, v in (("device", args.device), ("precision", args.precision),
                                                 ("batch_size", args.batch_size)) if v is not None]
    if args.channels_last is not None:
        overrides.append(f"engine.channels_last={str(args.channels_last).lower()}")
    overrides += args.overrides
    if args.checkpoint:
        return Segmenter.from_checkpoint(args.checkpoint, overrides)
    model = [f"model.arch={args.arch}", f"model.encoder={args.encoder}", "model.encoder_weights=none"]
    return Segmenter.from_config(load_config(args.config, model + overrides))


def _image(args: argparse.Namespace, segmenter: Segmenter) -> torch.Tensor:
    if args.image:
        from magseg.io.raster import read_array

        return segmenter.normalize(read_array(args.image, segmenter.config.data.bands))
    g = torch.Generator().manual_seed(0)
    return torch.randn(segmenter.config.model.in_channels, args.size, args.size, generator=g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "deepglobe.yaml"))
    parser.add_argument("--arch", default="Unet")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--checkpoint", default=None, help="use a trained model instead of random weights")
    parser.add_argument("--image", default=None, help="a raster to segment instead of random pixels")
    parser.add_argument("--size", type=int, default=2448, help="random scene height and width")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds after one warm-up")
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="NHWC convolutions (default: the config's engine.channels_last)")
    parser.add_argument("--adaptive-threshold", type=float, default=None)
    parser.add_argument("--adaptive-max-crops", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args()

    # As the magseg command does (magseg.allocator); MAGSEG_SYSTEM_MALLOC=1 measures without.
    malloc_kept = keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    segmenter = _segmenter(args)
    config = segmenter.config
    image = _image(args, segmenter)
    adaptive = AdaptiveConfig(threshold=args.adaptive_threshold, max_crops=args.adaptive_max_crops)
    if not adaptive.enabled:
        adaptive = config.engine.adaptive if config.engine.adaptive.enabled else AdaptiveConfig(threshold=0.05)
    adaptive_engine = dataclasses.replace(config.engine, adaptive=adaptive)

    # Warm-up run of the engine, recording every backbone call's arguments.
    calls: list[tuple] = []
    hook = segmenter.backbone.register_forward_pre_hook(lambda _m, inputs: calls.append(inputs))
    warm = segmenter.segment(image, return_stages=True)
    hook.remove()
    device = segmenter.device

    def sync() -> None:  # CUDA runs asynchronously: wait for it before reading the clock
        if device.type == "cuda":
            torch.cuda.synchronize()

    def backbone_alone() -> None:
        with torch.inference_mode(), precision_context(device, config.engine.precision):
            for inputs in calls:
                segmenter.backbone(*inputs)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    # The backbone's share of each timed engine run, measured inside it (forward hooks): the
    # paired view of (b) - (a), immune to the two being timed at different moments.
    inside: list[float] = []

    def engine_run() -> None:
        open_calls: list[float] = []
        spent = [0.0]

        def pre(_module, _inputs) -> None:
            sync()
            open_calls.append(time.perf_counter())

        def post(_module, _inputs, _output) -> None:
            sync()
            spent[0] += time.perf_counter() - open_calls.pop()

        handles = [segmenter.backbone.register_forward_pre_hook(pre),
                   segmenter.backbone.register_forward_hook(post)]
        try:
            segmenter.segment(image)
        finally:
            for handle in handles:
                handle.remove()
        inside.append(spent[0])

    methods = {
        "backbone": backbone_alone,
        "engine": engine_run,
        "patch_only": lambda: segmenter.segment(image, pyramid=config.pyramid.patch_only()),
        "adaptive": lambda: segmenter.segment(image, engine=adaptive_engine),
    }
    for fn in methods.values():  # warm every path once (kernels, allocator)
        fn()
    inside.clear()
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeat):
        for name, fn in methods.items():
            seconds[name].append(timed(fn))
    med = {name: statistics.median(values) for name, values in seconds.items()}
    fast = segmenter.segment(image, engine=adaptive_engine, return_stages=True)

    figures = {
        "scene": list(image.shape[-2:]),
        "model": f"{config.model.arch}/{config.model.encoder}",
        "trained": bool(args.checkpoint),
        "scales": [list(s) for s in config.pyramid.scales],
        "crop": list(config.pyramid.crop),
        "input": list(config.pyramid.input),
        "refine": {"points": config.refine.points, "kernel": config.refine.kernel},
        "refiner": segmenter.refiner is not None,
        "batch_size": config.engine.batch_size,
        "precision": resolve_precision(device, config.engine.precision),
        "channels_last": config.engine.channels_last,
        "adaptive": dataclasses.asdict(adaptive),
        "backbone_calls": len(calls),
        "crops": {"engine": [s.crops_run for s in warm.stages], "adaptive": [s.crops_run for s in fast.stages]},
        "seconds": {name: round(v, 3) for name, v in med.items()},
        "seconds_all_rounds": {name: [round(v, 3) for v in vs] for name, vs in seconds.items()},
        "ratios": {
            "engine_over_backbone": round(med["engine"] / med["backbone"], 3),
            "engine_over_patch_only": round(med["engine"] / med["patch_only"], 3),
            "adaptive_over_engine": round(med["adaptive"] / med["engine"], 3),
            # median over rounds of (engine run) / (backbone time inside that run)
            "engine_over_backbone_inside": round(
                statistics.median(e / b for e, b in zip(seconds["engine"], inside)), 3),
        },
        "backbone_inside_engine_seconds": round(statistics.median(inside), 3),
        "engine_own_seconds": round(statistics.median(e - b for e, b in zip(seconds["engine"], inside)), 3),
        "engine_stage_seconds": [round(s.seconds, 3) for s in warm.stages],
        "device": str(device),
        "threads": torch.get_num_threads(),
        "malloc_kept": malloc_kept,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "load_average": list(os.getloadavg()),
    }
    report_figures(figures, args.json)


if __name__ == "__main__":
    main()

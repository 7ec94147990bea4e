#!/usr/bin/env python
"""How much the progressive engine costs beside its backbone, on one scene, in one run.

Times, interleaved over ``--repeat`` rounds (median reported):
  (a) backbone: the backbone alone on exactly the crops the engine feeds it, in the same
      batches (recorded from a warm-up run of the engine, replayed);
  (b) engine:   the full progressive method (pyramid, refiner, error map, top-K, stitching);
  (c) patch:    the patch-only sliding window at the finest scale;
  (d) adaptive: the engine in adaptive mode (crops skipped by coarse uncertainty);
  (e) own:      the engine with a backbone that costs nothing (a fixed smooth random answer
                per input shape, made once): its own work alone, without the noise of a
                backbone timed beside it (not in the default --methods).
Each precision in --precision (default: fp32 and what ``auto`` resolves to on this machine,
its fastest, when that is another) gets its own models and figures; the rounds interleave the
precisions, so their ratios come from the same minutes of the same run. Prints the figures
and the ratios b/a, b/c and d/b per precision (under ``runs``, or at the top level when one
precision is measured) as one JSON object on stdout (and to --json), with the CPU (model,
torch's kernel level, the flags that decide the precisions), plus a paired view of the
overhead: the backbone's time measured inside each engine run (forward hooks), the engine's
own seconds beside it and their median ratio. Models come from --checkpoint, or from the
config with random weights (speed does not depend on them); the scene is --image (any
raster magseg reads) or random pixels.

    python scripts/bench_engine.py                                  # 2448^2, Unet-ResNet18
    python scripts/bench_engine.py --precision bf16                 # one precision only
    python scripts/bench_engine.py --precision fp32 --precision bf16 refiner.gate=false
    python scripts/bench_engine.py --arch FPN --encoder resnet50 --repeat 3
    python scripts/bench_engine.py --checkpoint runs/demo/best.ckpt --image scene.tif \\
        --adaptive-threshold 0.1
    python scripts/bench_engine.py --runtime torch --runtime onnxruntime --runtime openvino \\
        --precision fp32 --precision bf16 --methods backbone,engine

--runtime (repeatable, default torch) adds the backbone runtimes (engine.runtime): each
runtime x precision gets its own models and figures, named by the precision for torch and
``<runtime>-<precision it computes in>`` for the others, all interleaved in one run; then
``vs_torch_fp32`` gives each one's backbone and engine time over torch fp32's, and the share
of pixels whose labels agree with torch fp32's. ``--precision int8`` adds, for OpenVINO,
``engine.precision=int8`` (``pip install 'magseg[int8]'``): a checkpoint's int8 graph is the
one ``magseg quantize`` made; random weights are quantised here on 16 random windows (the
refiner's convolutions on the cells of one fp32 run), a speed, not an accuracy
(scripts/runtime_miou.py measures that).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
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
from magseg.engine.precision import precision_context, precision_flags, resolve_precision  # noqa: E402
from magseg.engine.runtime import RUNTIMES  # noqa: E402
from magseg.segmenter import Segmenter  # noqa: E402

def _segmenters(args: argparse.Namespace) -> dict[str, Segmenter]:
    """A segmenter for each runtime x precision asked for, by the name of what it computes
    (``fp32``, ``bf16`` for torch; ``onnxruntime-fp32``, ``openvino-bf16``, ...), without
    repeats: fp32 and the machine's fastest by default (one of them when ``auto`` is fp32)."""
    segmenters: dict[str, Segmenter] = {}
    for runtime in args.runtime or ["torch"]:
        for choice in args.precision or ["fp32", "auto"]:
            if choice == "int8":
                if runtime == "openvino":
                    segmenters["openvino-int8"] = _int8_segmenter(args)
                continue
            segmenter = _segmenter(args, choice, runtime)
            name = resolve_precision(segmenter.device, choice)
            if segmenter.backbone_runtime != "torch":
                name = f"{segmenter.backbone_runtime}-{segmenter.precision}"
            segmenters.setdefault(name, segmenter)
    return segmenters


def _segmenter(args: argparse.Namespace, precision: str, runtime: str = "torch") -> Segmenter:
    torch.manual_seed(0)  # the same random weights at every precision
    overrides = [f"engine.{k}={v}" for k, v in (("device", args.device), ("precision", precision),
                                                 ("batch_size", args.batch_size),
                                                 ("runtime", runtime)) if v is not None]
    if args.channels_last is not None:
        overrides.append(f"engine.channels_last={str(args.channels_last).lower()}")
    overrides += args.overrides
    if args.checkpoint:
        return Segmenter.from_checkpoint(args.checkpoint, overrides)
    model = [f"model.arch={args.arch}", f"model.encoder={args.encoder}", "model.encoder_weights=none"]
    return Segmenter.from_config(load_config(args.config, model + overrides))


def _int8_segmenter(args: argparse.Namespace) -> Segmenter:
    """OpenVINO at ``engine.precision=int8``; random weights get their int8 graphs here (once:
    the cache keeps them): the backbone's from 16 random windows at the pyramid's input size,
    the refiner's convolutions' from the cells of one fp32 run on the scene."""
    import numpy as np

    from magseg.engine.int8 import quantize_into_cache, quantize_refiner_into_cache, refiner_int8
    from magseg.quantize import refiner_cells

    if not args.checkpoint:
        fp32 = _segmenter(args, "fp32", "openvino")
        backbone = fp32.backbone
        if backbone.cache.int8_record() is None:
            rng = np.random.default_rng(0)
            multiple = backbone.input_multiple
            size = [-(-n // multiple) * multiple for n in fp32.config.pyramid.input]
            windows = [rng.standard_normal((1, backbone.cache.in_channels, *size)).astype(np.float32)
                       for _ in range(16)]
            quantize_into_cache(backbone.torch_model(), backbone.cache, windows,
                                {"calibration": "16 random windows (scripts/bench_engine.py)"}, progress=False)
        if fp32.refiner is not None and refiner_int8(fp32.refiner, backbone.cache, 1) is None:
            cells = refiner_cells(fp32, [_image(args, fp32)], 64)
            quantize_refiner_into_cache(fp32.refiner, backbone.cache, cells,
                                        {"calibration": "one fp32 run's cells (scripts/bench_engine.py)"},
                                        progress=False)
    return _segmenter(args, "int8", "openvino")


def _image(args: argparse.Namespace, segmenter: Segmenter) -> torch.Tensor:
    if args.image:
        from magseg.io.raster import read_array

        return segmenter.normalize(read_array(args.image, segmenter.config.data.bands))
    g = torch.Generator().manual_seed(0)
    return torch.randn(segmenter.config.model.in_channels, args.size, args.size, generator=g)


def _methods(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(METHODS)}")
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "deepglobe.yaml"))
    parser.add_argument("--arch", default="Unet")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--checkpoint", default=None, help="use a trained model instead of random weights")
    parser.add_argument("--image", default=None, help="a raster to segment instead of random pixels")
    parser.add_argument("--size", type=int, default=2448, help="random scene height and width")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds after one warm-up")
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", action="append", default=None,
                        choices=["auto", "fp32", "bf16", "fp16", "int8"],
                        help="a precision to measure, repeatable (default: fp32 and auto, this machine's fastest); "
                             "int8: OpenVINO only (engine.precision=int8; pip install 'magseg[int8]')")
    parser.add_argument("--runtime", action="append", default=None,
                        choices=list(RUNTIMES),
                        help="a backbone runtime to measure, repeatable (default: torch)")
    parser.add_argument("--methods", type=_methods, default=[m for m in METHODS if m != "own"],
                        help=f"what to time each round, comma-separated, of {','.join(METHODS)} "
                             "(default: all but own)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="NHWC convolutions (default: the config's engine.channels_last)")
    parser.add_argument("--adaptive-threshold", type=float, default=None)
    parser.add_argument("--adaptive-max-crops", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--sections", action="store_true",
                        help="after the rounds, one engine run per precision timed helper by helper")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    return parser


def _measure(args: argparse.Namespace, benches: dict[str, "_Bench"]) -> dict[str, dict]:
    """Warm every bench, time ``args.repeat`` rounds, and return each precision's figures
    (with its --sections timings when asked for)."""
    for bench in benches.values():  # warm every path once (kernels, allocator)
        bench.warm()
    for _ in range(args.repeat):  # precisions interleaved: their ratios share the run's drift
        for bench in benches.values():
            bench.round()
    runs = {precision: bench.figures() for precision, bench in benches.items()}
    _versus_torch_fp32(benches, runs)
    if args.sections:
        for precision, bench in benches.items():
            runs[precision]["sections"] = _sections(bench)
    return runs


def _versus_torch_fp32(benches: dict[str, "_Bench"], runs: dict[str, dict]) -> None:
    """Each run's backbone and engine medians over torch fp32's, and how many of its labels
    agree with torch fp32's (from the warm-up runs), when torch fp32 was measured."""
    reference = benches.get("fp32")
    if reference is None or len(benches) < 2:
        return
    base = runs["fp32"]["seconds"]
    for name, bench in benches.items():
        seconds = runs[name]["seconds"]
        runs[name]["vs_torch_fp32"] = {
            **{m: round(seconds[m] / base[m], 3) for m in seconds if base.get(m)},
            "labels_agree": round(float((bench.warm_result.labels == reference.warm_result.labels)
                                        .float().mean()), 6),
        }


def _setup(args: argparse.Namespace, benches: dict[str, "_Bench"], malloc_kept: bool) -> dict:
    """What was measured and on what: scene, model, pyramid, engine settings, the machine.

    Read after the rounds, so the load average is the one the rounds ran under.
    """
    first = next(iter(benches.values()))
    config = first.config
    return {
        "scene": list(first.image.shape[-2:]),
        "model": f"{config.model.arch}/{config.model.encoder}",
        "trained": bool(args.checkpoint),
        "scales": [list(s) for s in config.pyramid.scales],
        "crop": list(config.pyramid.crop),
        "input": list(config.pyramid.input),
        "refine": {"points": config.refine.points, "kernel": config.refine.kernel},
        "refiner": first.segmenter.refiner is not None,
        "batch_size": config.engine.batch_size,
        "channels_last": config.engine.channels_last,
        "runtimes": sorted({bench.segmenter.backbone_runtime for bench in benches.values()}),
        "adaptive": dataclasses.asdict(first.adaptive),
        "fastest": resolve_precision(first.device, "auto"),
        "device": str(first.device),
        "threads": torch.get_num_threads(),
        "malloc_kept": malloc_kept,
        "cpus": os.cpu_count(),
        "cpu_flags": precision_flags(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "load_average": list(os.getloadavg()),
    }


def _by_precision(runs: dict[str, dict]) -> dict:
    """The figures of the precisions: one precision's at the top level (as
    scripts/gpu_check.sh reads them), else the headline ratios side by side and every run."""
    if len(runs) == 1:
        return next(iter(runs.values()))
    return {
        "engine_over_backbone": {p: run["ratios"]["engine_over_backbone"] for p, run in runs.items()},
        "engine_over_backbone_inside": {p: run["ratios"]["engine_over_backbone_inside"]
                                        for p, run in runs.items()},
        "engine_own_seconds": {p: run["engine_own_seconds"] for p, run in runs.items()},
        "runs": runs,
    }


def main() -> None:
    parser = _parser()
    args = parser.parse_args()
    if "int8" in (args.precision or []):
        if "openvino" not in (args.runtime or []):
            parser.error("--precision int8 is OpenVINO's: add --runtime openvino")
        if importlib.util.find_spec("nncf") is None:
            parser.error("--precision int8 needs NNCF: pip install 'magseg[int8]'")
    # As the magseg command does (magseg.allocator); MAGSEG_SYSTEM_MALLOC=1 measures without.
    malloc_kept = keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    benches = {precision: _Bench(args, precision, segmenter)
               for precision, segmenter in _segmenters(args).items()}
    runs = _measure(args, benches)
    figures = _setup(args, benches, malloc_kept)
    figures.update(_by_precision(runs))
    report_figures(figures, args.json)


# What a round can time (--methods).
METHODS = ("backbone", "engine", "patch_only", "adaptive", "own")

# The engine's helpers timed by --sections, by module (``Class.method`` for a method): each
# call's inclusive seconds (they nest: input_probs holds run_backbone, backbone_inputs holds
# shrink_planes, StageRun.fused_step holds StageRun.window_cells and Refiner.fused_from_cells, which holds
# refine_pass; refine_labels holds top_error_pixels). A name a module imported from another
# is timed where the engine calls it (magseg.engine.stages).
SECTIONS = {
    "magseg.engine.stages": ("run_backbone", "input_probs", "backbone_inputs",
                             "enlarged_crops_and_cells", "refine_weights", "refine_crops", "refine_labels",
                             "labels_of", "StageRun.window_probs", "StageRun.fused_step",
                             "StageRun.window_cells", "StageRun.refined_in_windows"),
    "magseg.engine.inputs": ("resample_windows", "window_pieces", "shrink_planes"),
    "magseg.engine.refine_step": ("error_score", "error_score_and_tops", "top_error_pixels", "top_k_owned",
                                  "labels_of"),
    "magseg.engine.blend": ("FineStore.crops_and_cells", "FineStore.views"),
    "magseg.engine.refiner_network": ("Refiner.weights_from_cells", "Refiner.weights_and_total",
                                      "Refiner.fused_from_cells", "Refiner._small", "refine_pass"),
}


def _sections(bench: "_Bench") -> dict[str, dict[str, float]]:
    """One engine run with each helper in SECTIONS wrapped by a timer: seconds and calls."""
    import importlib

    spent: dict[str, list[float]] = {}
    saved = []

    def timed(name: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                bench.sync()
                spent.setdefault(name, []).append(time.perf_counter() - start)
        return wrapper

    for module_name, names in SECTIONS.items():
        module = importlib.import_module(module_name)
        for name in names:
            owner_name, _, attribute = name.rpartition(".")
            owner = getattr(module, owner_name, None) if owner_name else module
            if owner is not None and attribute in vars(owner):
                saved.append((owner, attribute, getattr(owner, attribute)))
                setattr(owner, attribute, timed(name, getattr(owner, attribute)))
    try:
        start = time.perf_counter()
        bench.segmenter.segment(bench.image)
        bench.sync()
        total = time.perf_counter() - start
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)
    sections = {name: {"seconds": round(sum(v), 3), "calls": len(v)} for name, v in spent.items()}
    sections["segment"] = {"seconds": round(total, 3), "calls": 1}
    return sections


def _without_backbone_cost(segmenter: Segmenter, image: torch.Tensor) -> None:
    """``segmenter.segment(image)`` with the backbone's forward replaced by a fixed answer per
    input shape: smooth random logits ``(B, classes, h, w)``, made once and kept (so the
    refine step has uncertain pixels to pick, as with a real model); their softmax for a
    backbone that gives probabilities (a runtime's graph)."""
    from magseg.engine.backbone import gives_probabilities

    backbone, answers = segmenter.backbone, _ANSWERS.setdefault(id(segmenter), {})
    classes = segmenter.config.num_classes
    probabilities = gives_probabilities(backbone)

    def answer(x: torch.Tensor, *_contexts: torch.Tensor) -> torch.Tensor:
        key = tuple(x.shape)
        if key not in answers:
            g = torch.Generator().manual_seed(0)
            coarse = torch.randn(x.shape[0], classes, max(1, x.shape[2] // 32), max(1, x.shape[3] // 32),
                                 generator=g) * 4
            logits = torch.nn.functional.interpolate(coarse, size=x.shape[2:], mode="bilinear")
            answers[key] = (logits.softmax(dim=1) if probabilities else logits).to(x.device)
        return answers[key]

    backbone.forward = answer
    try:
        segmenter.segment(image)
    finally:
        del backbone.forward


_ANSWERS: dict[int, dict[tuple[int, ...], torch.Tensor]] = {}


class _Bench:
    """The four timed methods of one precision, with its own models."""

    def __init__(self, args: argparse.Namespace, precision: str, segmenter: Segmenter) -> None:
        self.precision = precision
        self.segmenter = segmenter
        self.config = config = segmenter.config
        self.image = image = _image(args, segmenter)
        adaptive = AdaptiveConfig(threshold=args.adaptive_threshold, max_crops=args.adaptive_max_crops)
        if not adaptive.enabled:
            adaptive = config.engine.adaptive if config.engine.adaptive.enabled else AdaptiveConfig(threshold=0.05)
        self.adaptive = adaptive
        self.adaptive_engine = adaptive_engine = dataclasses.replace(config.engine, adaptive=adaptive)

        # Warm-up run of the engine, recording every backbone call's arguments.
        self.calls = calls = []
        hook = segmenter.backbone.register_forward_pre_hook(lambda _m, inputs: calls.append(inputs))
        self.warm_result = segmenter.segment(image, return_stages=True)
        hook.remove()
        self.device = device = segmenter.device
        # The backbone's share of each timed engine run, measured inside it (forward hooks):
        # the paired view of (b) - (a), immune to the two being timed at different moments.
        self.inside: list[float] = []

        def backbone_alone() -> None:
            with torch.inference_mode(), precision_context(device, config.engine.precision):
                for inputs in calls:
                    segmenter.backbone(*inputs)

        def engine_run() -> None:
            open_calls: list[float] = []
            spent = [0.0]

            def pre(_module, _inputs) -> None:
                self.sync()
                open_calls.append(time.perf_counter())

            def post(_module, _inputs, _output) -> None:
                self.sync()
                spent[0] += time.perf_counter() - open_calls.pop()

            handles = [segmenter.backbone.register_forward_pre_hook(pre),
                       segmenter.backbone.register_forward_hook(post)]
            try:
                segmenter.segment(image)
            finally:
                for handle in handles:
                    handle.remove()
            self.inside.append(spent[0])

        methods = {
            "backbone": backbone_alone,
            "engine": engine_run,
            "patch_only": lambda: segmenter.segment(image, pyramid=config.pyramid.patch_only()),
            "adaptive": lambda: segmenter.segment(image, engine=adaptive_engine),
            "own": lambda: _without_backbone_cost(segmenter, image),
        }
        self.methods = {name: fn for name, fn in methods.items() if name in args.methods}
        self.seconds: dict[str, list[float]] = {name: [] for name in self.methods}

    def sync(self) -> None:  # CUDA runs asynchronously: wait for it before reading the clock
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def warm(self) -> None:
        for fn in self.methods.values():
            fn()
        self.inside.clear()

    def round(self) -> None:
        for name, fn in self.methods.items():
            start = time.perf_counter()
            fn()
            self.sync()
            self.seconds[name].append(time.perf_counter() - start)

    def figures(self) -> dict:
        seconds, inside = self.seconds, self.inside
        med = {name: statistics.median(values) for name, values in seconds.items()}
        fast = (self.segmenter.segment(self.image, engine=self.adaptive_engine, return_stages=True)
                if "adaptive" in med else None)
        # Each stage's seconds from one more run, warm: the warm-up run's include the runtimes'
        # graph exports and compilations; the timed rounds keep no per-stage maps.
        staged = self.segmenter.segment(self.image, return_stages=True) if "engine" in med else None

        def ratio(a: str, b: str) -> float | None:
            return round(med[a] / med[b], 3) if a in med and b in med else None

        paired = (round(statistics.median(e / b for e, b in zip(seconds["engine"], inside)), 3)
                  if "engine" in med else None)
        return {
            "precision": self.precision,
            "backbone_calls": len(self.calls),
            "crops": {"engine": [s.crops_run for s in self.warm_result.stages],
                      "adaptive": None if fast is None else [s.crops_run for s in fast.stages]},
            "seconds": {name: round(v, 3) for name, v in med.items()},
            "seconds_all_rounds": {name: [round(v, 3) for v in vs] for name, vs in seconds.items()},
            "ratios": {
                "engine_over_backbone": ratio("engine", "backbone"),
                "engine_over_patch_only": ratio("engine", "patch_only"),
                "adaptive_over_engine": ratio("adaptive", "engine"),
                # median over rounds of (engine run) / (backbone time inside that run)
                "engine_over_backbone_inside": paired,
            },
            "runtime": self.segmenter.backbone_runtime,
            "backbone_inside_engine_seconds": round(statistics.median(inside), 3) if inside else None,
            "engine_own_seconds": (round(statistics.median(e - b for e, b in zip(seconds["engine"], inside)), 3)
                                   if inside else None),
            "engine_stage_seconds": None if staged is None else [round(s.seconds, 3) for s in staged.stages],
        }


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""What a backbone runtime's reduced precision costs in accuracy: one checkpoint's test
split segmented by the progressive method under several runtime x precision variants, the
same scenes in the same run, with mIoU and the share of pixels whose labels agree with the
first variant's.

Variants are ``<runtime>-<precision>``: ``torch-fp32``, ``torch-bf16``, ``onnxruntime-fp32``,
``openvino-fp32``, ``openvino-bf16`` (``engine.runtime`` x ``engine.precision``), and
``onnxruntime-int8``: the exported graph quantised by ONNX Runtime's static post-training
quantisation (``magseg.engine.runtime.quantize_int8``: QDQ, int8 weights per channel, int8
activations), calibrated on ``--calibration`` windows of the training split cut as training
cuts them (``magseg.quantize.calibration_windows``), which magseg does not offer;
``openvino-int8``: ``engine.precision=int8``, the graph ``magseg quantize`` makes (NNCF's
post-training quantisation: per-channel int8 weights, int8 activations, bias correction,
weights of 8 bits on a CPU with VNNI and of 7 in every layer elsewhere, or as
``--weight-bits`` says; ``pip install 'magseg[int8]'``) on the same windows, and the
refiner's convolutions quantised on the cells the engine feeds them (``magseg quantize``'s
4 scenes); ``openvino-int8-backbone``: the same with the refiner's convolutions in float32.
This is the measurement behind docs/runtimes.md#reduced-precision.

    python scripts/runtime_miou.py demo_out/run/best.ckpt demo_out/data \\
        --variants torch-fp32,torch-bf16,openvino-bf16,onnxruntime-int8
    python scripts/runtime_miou.py demo_out/run/best.ckpt demo_out/data \\
        --variants torch-fp32,openvino-fp32,openvino-int8,onnxruntime-int8

``--speed N`` then times the variants on the first N test scenes, interleaved over three
rounds (after one untimed pass), and reports each one's median over the first's
(``--no-miou``: only that). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from magseg.checkpoint import load_checkpoint
from magseg.data.scenes import list_scenes, read_scene
from magseg.engine import int8
from magseg.engine import runtime as rt
from magseg.engine.precision import precision_flags
from magseg.evaluation.metrics import confusion_matrix, scores
from magseg.quantize import calibration_windows as training_windows
from magseg.quantize import quantize_checkpoint
from magseg.segmenter import Segmenter


def calibration_windows(config, data_root: str, count: int, size: tuple[int, int],
                        batch: int = 8) -> list[np.ndarray]:
    """``count`` training windows (``magseg quantize``'s) resized to ``size``, in batches."""
    windows = []
    for window in training_windows(config, data_root, "train", count, multiple=1):
        x = torch.from_numpy(window)
        if tuple(x.shape[-2:]) != tuple(size):
            x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        windows.append(x[0])
    return [torch.stack(windows[i:i + batch]).numpy() for i in range(0, count, batch)]


class Int8Backbone(rt.RuntimeBackbone):
    """The ONNX Runtime backbone on the int8 quantisation of its cached fp32 graph."""

    calibrate = None  # size -> calibration batches

    def runner(self, size):
        if size not in self._runners:
            fp32 = self.cache.build(size, self.torch_model)  # the cached graph where it checks out
            int8 = fp32.with_name(fp32.stem + ".int8.onnx")
            rt.quantize_int8(fp32, int8, self.calibrate(size))
            # Its own session: the cache's optimised forms are the fp32 graph's.
            self._runners[size] = rt.GRAPH_RUNTIMES["onnxruntime"].load(int8, self.threads, "fp32")
        return self._runners[size]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("data_root")
    parser.add_argument("--variants", default="torch-fp32,torch-bf16,openvino-bf16,onnxruntime-int8")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every variant, e.g. engine.compiled=on (repeatable)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--calibration", type=int, default=64, metavar="N",
                        help="training windows calibrating int8 (default 64)")
    parser.add_argument("--weight-bits", default="auto", metavar="auto|7|8",
                        help="openvino-int8's weights' width (magseg quantize --weight-bits)")
    parser.add_argument("--speed", type=int, default=0, metavar="N")
    parser.add_argument("--no-miou", action="store_true", help="only the speed (with --speed)")
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    config = ckpt.config
    cache = Path(tempfile.mkdtemp(prefix="magseg-runtime-miou-"))
    variants = args.variants.split(",")
    if "openvino-int8" in variants:
        if not int8.nncf_installed():
            sys.exit(f"runtime_miou.py: openvino-int8 needs NNCF: pip install '{int8.EXTRA}'")
        weight_bits = quantize_checkpoint(ckpt, args.data_root, windows=args.calibration, progress=False,
                                          weight_bits=args.weight_bits,
                                          overrides=[f"engine.cache_dir={cache}", *args.set]).weight_bits
    segmenters = {}
    for variant in variants:
        runtime, precision, *part = variant.split("-")
        ort_int8 = variant == "onnxruntime-int8"  # not an engine.precision: the script quantises it
        sets = [f"engine.cache_dir={cache}", f"engine.runtime={runtime}",
                f"engine.precision={'fp32' if ort_int8 else precision}", *args.set]
        segmenter = Segmenter.from_checkpoint(ckpt, sets)
        if part == ["backbone"] and segmenter.refiner is not None:  # openvino-int8-backbone
            segmenter.refiner.int8_convolutions = None
        if ort_int8:
            segmenter.backbone.__class__ = Int8Backbone
            segmenter.backbone.calibrate = lambda size: calibration_windows(
                config, args.data_root, args.calibration, size)
        segmenters[variant] = segmenter
    scenes = list_scenes(config.data, args.split, args.data_root)
    classes = config.num_classes
    matrices = {v: torch.zeros(classes, classes, dtype=torch.int64) for v in variants}
    agree = dict.fromkeys(variants, 0)
    pixels = 0
    first = segmenters[variants[0]]
    for scene in [] if args.no_miou else scenes:
        image, mask = read_scene(scene, config)
        x, target = first.normalize(image), torch.from_numpy(mask)
        reference = None
        for variant in variants:
            with torch.inference_mode():
                labels = segmenters[variant].segment(x).labels
            matrices[variant] += confusion_matrix(labels, target, classes)
            reference = labels if reference is None else reference
            agree[variant] += int((labels == reference).sum())
        pixels += reference.numel()
    in_mean = [c.in_mean for c in config.classes]
    out = {
        "checkpoint": args.checkpoint, "split": args.split, "scenes": len(scenes),
        "cpu": {**first.runtime["cpu"], "flags": precision_flags()},
    }
    if "openvino-int8" in variants:
        out["weight_bits"] = weight_bits
    if not args.no_miou:
        out["miou"] = {v: round(100 * scores(matrices[v], in_mean)["miou"], 2) for v in variants}
        out["label_agreement_with_first"] = {v: round(agree[v] / pixels, 5) for v in variants}
    if args.speed:
        xs = [first.normalize(read_scene(s, config)[0]) for s in scenes[: args.speed]]
        with torch.inference_mode():  # graphs exported, quantised and loaded before timing
            for variant in variants:
                segmenters[variant].segment(xs[0])
        seconds = {v: [] for v in variants}
        for _ in range(3):
            for variant in variants:
                start = time.perf_counter()
                with torch.inference_mode():
                    for x in xs:
                        segmenters[variant].segment(x)
                seconds[variant].append(time.perf_counter() - start)
        medians = {v: statistics.median(s) for v, s in seconds.items()}
        out["seconds"] = seconds
        out["time_over_first"] = {v: round(medians[v] / medians[variants[0]], 3) for v in variants}
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())

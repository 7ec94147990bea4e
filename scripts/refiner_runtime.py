#!/usr/bin/env python
"""Whether the refiner would pay in a backbone runtime: its share of the engine's time, and
torch's ``Refiner.weights`` against its exported graph in ONNX Runtime on the same crops.

The engine runs the progressive method on the first N test scenes of a checkpoint's data
(after one warm-up scene), timing every refiner call it makes (``weights_from_cells`` or
``fused_from_cells`` where a stage's windows are grown by a margin, as by default; else
``weights_and_total``) and keeping the crops each was given; then those crops go through
torch's ``weights`` and through ``export_refiner_onnx``'s graph in ONNX Runtime, interleaved
over five rounds. A checkpoint of the backbone phase (no refiner yet) gets a
fresh refiner: the time does not depend on its weights. Prints two JSON lines.

    OMP_NUM_THREADS=1 python scripts/refiner_runtime.py demo_out/run/best.ckpt demo_out/data --scenes 4
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

from magseg.checkpoint import load_checkpoint, load_state
from magseg.data.scenes import list_scenes, read_scene
from magseg.engine.runtime import export_refiner_onnx
from magseg.segmenter import Segmenter, create_refiner, create_segmenter_model


# Each refiner entry point the engine may call -> where its arguments hold the crops' fine and
# coarse maps.
ENTRIES = {"fused_from_cells": (2, 3), "weights_from_cells": (2, 3), "weights_and_total": (0, 1),
           "weights": (0, 1), "probs": (0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("data_root")
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    if ckpt.refiner is not None:
        segmenter = Segmenter.from_checkpoint(ckpt, [f"engine.precision={args.precision}"])
    else:
        config = ckpt.config.override({"refiner.enabled": True, "engine.precision": args.precision})
        backbone = create_segmenter_model(config, pretrained=False)
        load_state(backbone, ckpt.backbone, "backbone", ckpt.path)
        segmenter = Segmenter(config, backbone, create_refiner(config))
    refiner = segmenter.refiner
    # The replay's torch side: R's unnormalised weights where the refiner has them (the
    # refine step divides by their sum itself), else its probabilities.
    call = getattr(refiner, "weights", None) or refiner.probs
    spent, calls, depth, entries = [0.0], [], [0], collections.Counter()

    def timed(entry, method, crops):
        """``method`` timed where the engine calls it (not inside another entry point), the
        crops it was given, ``(fine, coarse)`` at ``crops`` of its arguments, kept."""

        def run(*args):
            depth[0] += 1
            start = time.perf_counter()
            try:
                return method(*args)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    spent[0] += time.perf_counter() - start
                    entries[entry] += 1
                    calls.append(tuple(args[i].clone() for i in crops))

        return run

    # The engine's entry points (which one a stage calls depends on its margin and size,
    # magseg.engine.stages): from the windows' cells, fused with the refine step or not, or
    # from the crops.
    for entry, crops in ENTRIES.items():
        if hasattr(refiner, entry):
            setattr(refiner, entry, timed(entry, getattr(refiner, entry), crops))
    scenes = list_scenes(segmenter.config.data, "test", args.data_root)[: args.scenes + 1]
    images = [segmenter.normalize(read_scene(s, segmenter.config)[0]) for s in scenes]
    with torch.inference_mode():
        segmenter.segment(images[0])
        spent[0], calls[:] = 0.0, []
        entries.clear()
        start = time.perf_counter()
        for image in images[1:]:
            segmenter.segment(image)
        engine = time.perf_counter() - start
    print(json.dumps({"scenes": len(images) - 1, "engine_s": engine, "refiner_s": spent[0],
                      "refiner_share": spent[0] / engine, "refiner_calls": dict(entries),
                      "threads": torch.get_num_threads()}))
    shape = calls[0][0].shape
    same = [c for c in calls if c[0].shape[1:] == shape[1:]]
    path = Path(tempfile.mkdtemp(prefix="magseg-refiner-")) / "refiner.onnx"
    export_refiner_onnx(refiner, path, shape[1], tuple(shape[-2:]))
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    seconds = {"torch": [], "onnxruntime": []}
    for _ in range(5):
        start = time.perf_counter()
        with torch.inference_mode():
            for fine, coarse in same:
                call(fine, coarse)
        seconds["torch"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for fine, coarse in same:
            torch.from_numpy(session.run(None, {"fine": fine.numpy(), "coarse": coarse.numpy()})[0])
        seconds["onnxruntime"].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in seconds.items()}
    print(json.dumps({"batches": len(same), "batch_shape": list(shape), "seconds": seconds,
                      "onnxruntime_over_torch": medians["onnxruntime"] / medians["torch"]}))


if __name__ == "__main__":
    main()

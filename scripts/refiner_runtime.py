#!/usr/bin/env python
"""Whether the refiner would pay in a backbone runtime: its share of the engine's time, and
torch's ``Refiner.weights`` (what the engine calls) against its exported graph in ONNX Runtime on the same crops.

The engine runs the progressive method on the first N test scenes of a checkpoint's data
(after one warm-up scene), timing every refiner call and keeping the calls' inputs; then
those inputs go through torch and through ``export_refiner_onnx``'s graph in ONNX Runtime,
interleaved over five rounds. A checkpoint of the backbone phase (no refiner yet) gets a
fresh refiner: the time does not depend on its weights. Prints two JSON lines.

    OMP_NUM_THREADS=1 python scripts/refiner_runtime.py demo_out/run/best.ckpt demo_out/data --scenes 4
"""

from __future__ import annotations

import argparse
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
    # What the engine calls: R's unnormalised weights where the refiner has them (the refine
    # step divides by their sum itself), else its probabilities.
    entry = "weights" if hasattr(refiner, "weights") else "probs"
    call = getattr(refiner, entry)
    spent, calls = [0.0], []

    def timed(fine, coarse):
        start = time.perf_counter()
        out = call(fine, coarse)
        spent[0] += time.perf_counter() - start
        calls.append((fine.clone(), coarse.clone()))
        return out

    setattr(refiner, entry, timed)
    scenes = list_scenes(segmenter.config.data, "test", args.data_root)[: args.scenes + 1]
    images = [segmenter.normalize(read_scene(s, segmenter.config)[0]) for s in scenes]
    with torch.inference_mode():
        segmenter.segment(images[0])
        spent[0], calls[:] = 0.0, []
        start = time.perf_counter()
        for image in images[1:]:
            segmenter.segment(image)
        engine = time.perf_counter() - start
    print(json.dumps({"scenes": len(images) - 1, "engine_s": engine, "refiner_s": spent[0],
                      "refiner_share": spent[0] / engine, "threads": torch.get_num_threads()}))
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

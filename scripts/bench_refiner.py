#!/usr/bin/env python
"""What the refiner's gate costs: ``Refiner.probs`` with and without the gate on one engine
batch, beside the backbone on the same crops; and its convolutions alone on the batch's
window cells (the crops grown by ``pyramid.margin``, pooled at ``context_stride``) from NCHW
and from a channels-last copy, the layout inference takes on a CPU (``Refiner._convolved``);
with ``--openvino``, also exported and compiled by OpenVINO at f32 and, where NNCF is
installed, quantised to int8 (on random cells: a speed, not an accuracy). Calls are
interleaved and the minimum of ``--repeat`` is reported (on a shared machine the minimum is
the least disturbed), the convolutions' medians too.

    python scripts/bench_refiner.py --config configs/demo.yaml --threads 1
    python scripts/bench_refiner.py --config configs/deepglobe.yaml --threads 2
    python scripts/bench_refiner.py --config configs/deepglobe.yaml --threads 2 --openvino

stdout: one JSON object, milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from figures import report as report_figures  # noqa: E402

from magseg.config import load_config  # noqa: E402
from magseg.engine.refiner_network import Refiner  # noqa: E402
from magseg.engine.stages import crop_probs  # noqa: E402
from magseg.segmenter import create_segmenter_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--batch", type=int, default=None, help="crops per call (default: engine.batch_size)")
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--openvino", action="store_true",
                        help="also the convolutions in OpenVINO, f32 and int8 (pip install 'magseg[int8]')")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    b = args.batch or cfg.engine.batch_size
    (h, w), c = cfg.pyramid.crop, cfg.num_classes
    torch.manual_seed(0)
    fine = torch.softmax(torch.randn(b, c, h, w) * 3, 1)
    coarse = torch.softmax(torch.randn(b, c, h, w) * 3, 1)
    crops = torch.randn(b, cfg.model.in_channels, h, w)
    backbone = create_segmenter_model(cfg, pretrained=False).eval()
    refiners = {}
    for gate in (False, True):
        refiners[gate] = Refiner(c, cfg.refiner.channels, cfg.refiner.context_stride, gate=gate).eval()
        torch.nn.init.normal_(refiners[gate].context[-1].weight, std=0.5)  # a nonzero correction
    stride, margin = cfg.refiner.context_stride, cfg.pyramid.margin_pixels
    cells = torch.randn(b, 2 * c, *(-(-(n + 2 * m) // stride) for n, m in zip((h, w), margin)))
    context = refiners[True].context
    calls = {
        "convolutions_nchw": lambda: context(cells),
        "convolutions_channels_last": lambda: context(cells.contiguous(memory_format=torch.channels_last)).contiguous(),
        "refiner_no_gate": lambda: refiners[False].probs(fine, coarse),
        "refiner_gate": lambda: refiners[True].probs(fine, coarse),
        "backbone": lambda: crop_probs(backbone, crops, cfg.pyramid.input, precision="fp32"),
    }
    scratch = tempfile.TemporaryDirectory(prefix="magseg-bench-refiner-")
    if args.openvino:
        calls.update(_openvino_calls(context, cells, Path(scratch.name)))
    times: dict[str, list[float]] = {k: [] for k in calls}
    with torch.inference_mode():
        for i in range(args.repeat):
            for name, call in calls.items():
                if name == "backbone" and i % 5:  # slow: every fifth round
                    continue
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    out = {"batch": [b, c, h, w], "threads": torch.get_num_threads(),
           **{f"{k}_ms": round(1000 * min(v), 2) for k, v in times.items()}}
    out["cells"] = list(cells.shape)
    out.update({f"{k}_median_ms": round(1000 * statistics.median(v), 2)
                for k, v in times.items() if k.startswith("convolutions")})
    out["gate_extra_over_backbone"] = round((min(times["refiner_gate"]) - min(times["refiner_no_gate"]))
                                            / min(times["backbone"]), 4)
    report_figures(out)
    scratch.cleanup()
    return 0


def _openvino_calls(context: torch.nn.Module, cells: torch.Tensor, scratch: Path) -> dict[str, Callable[[], object]]:
    """The convolutions exported (batch free) and compiled by OpenVINO as the engine compiles a
    backbone: f32, and int8 quantised by NNCF on eight random batches of cells where it is
    installed."""
    from magseg.engine.int8 import nncf_installed, quantize
    from magseg.engine.runtime import _openvino_compile, _save_onnx

    graph = scratch / "convolutions.onnx"
    _save_onnx(context, {"cells": tuple(cells.shape[1:])}, graph, "correction", None)
    threads, array = torch.get_num_threads(), cells.numpy()
    compiled = {"convolutions_openvino_f32": _openvino_compile(graph, threads, "fp32")}
    if nncf_installed():
        windows = [torch.randn(1, *cells.shape[1:]).numpy() for _ in range(8)]
        compiled["convolutions_openvino_int8"] = _openvino_compile(quantize(graph, windows, progress=False),
                                                                   threads, "fp32")
    requests = {name: model.create_infer_request() for name, model in compiled.items()}
    return {name: (lambda request=request: request.infer({0: array})) for name, request in requests.items()}


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Would fusing the engine's full-resolution passes pay on this machine?

Times the work a refined batch does after its backbone, on the engine's own functions: R
(``Refiner.probs``: pooling, the correction, the upsampling, the gate, the reweighting), the
error score ``cert(R) * (1 - cert(Y))`` and both argmaxes (``labels_of``), eager against
``torch.compile`` (inductor: it fuses chains of elementwise passes into one loop, within
each of the graphs dynamo splits the step into). The
correction's last convolution gets random weights, so R differs from the fine map as a
trained refiner's does. Prints one JSON object: the CPU, the medians, the first call's
seconds, the number of graphs and how far the compiled results are from the eager ones.

    python scripts/bench_fusion.py                     # 4 crops of 612 px, 7 classes, fp32
    python scripts/bench_fusion.py --batch 1 --size 1024
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from magseg.engine.certainty import certainty, error_score  # noqa: E402
from magseg.engine.precision import cpu_info, precision_flags  # noqa: E402
from magseg.engine.refine_step import labels_of  # noqa: E402
from magseg.engine.refiner_network import Refiner, RefinerGate, _tv_distance  # noqa: E402


def _constant_gate(gate: RefinerGate):
    """``gate.from_maps`` with its weights read once: the same arithmetic, in the same order."""
    w0, w1, w2 = (float(v) * gate.SCALE for v in gate.weight.detach())
    bias = float(gate.bias.detach()) * gate.SCALE

    def from_maps(fine: torch.Tensor, coarse: torch.Tensor, smooth: torch.Tensor) -> torch.Tensor:
        logit = certainty(fine).mul_(w0).add_(bias)
        if w1:
            logit.add_(_tv_distance(fine, coarse), alpha=w1)
        if w2:
            logit.add_(_tv_distance(fine, smooth), alpha=w2)
        return logit.sigmoid_()[:, None]

    return from_maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=612, help="crop height and width")
    parser.add_argument("--classes", type=int, default=7)
    parser.add_argument("--stride", type=int, default=8, help="the refiner's context stride")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    torch.manual_seed(0)
    refiner = Refiner(args.classes, context_stride=args.stride).eval()
    torch.nn.init.normal_(refiner.context[-1].weight, std=0.5)
    shape = (args.batch, args.classes, args.size, args.size)
    fine, coarse = torch.randn(shape).softmax(dim=1), torch.randn(shape).softmax(dim=1)

    def step(fine: torch.Tensor, coarse: torch.Tensor) -> tuple[torch.Tensor, ...]:
        refined = refiner.probs(fine, coarse)
        return error_score(refined, coarse), labels_of(refined), labels_of(coarse)

    # The gate reads its four weights as Python numbers (``.item()``), a graph break for
    # dynamo; read once here, they are constants. The refiner's band-by-band inference still
    # breaks the step into several graphs (its sizes become Python integers, its cell sums
    # write into views): inductor fuses within each, and the JSON says how many there were.
    refiner.gate.from_maps = _constant_gate(refiner.gate)
    compiled = torch.compile(step)

    def median_seconds(fn) -> float:
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            fn(fine, coarse)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    with torch.inference_mode():
        start = time.perf_counter()
        fused = compiled(fine, coarse)
        first_call = time.perf_counter() - start
        graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        eager = step(fine, coarse)
        eager_s, compiled_s = median_seconds(step), median_seconds(compiled)
    print(json.dumps({
        "cpu": {**cpu_info(), "flags": precision_flags(), "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "batch": list(shape),
        "eager_ms": round(1000 * eager_s, 1),
        "compiled_ms": round(1000 * compiled_s, 1),
        "compiled_first_call_s": round(first_call, 1),
        "compiled_graphs": graphs,
        "error_score_max_abs_diff": float((fused[0] - eager[0]).abs().max()),
        "labels_agree": float((fused[1] == eager[1]).float().mean()),
    }, indent=2))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Time the progressive engine on one synthetic scene (default 2448 x 2448, DeepGlobe pyramid).

Prints per-stage and total wall time as JSON (stdout). Models are built from the config with
random weights (speed does not depend on them); nothing is downloaded.

    python scripts/bench_engine.py                      # 2448^2, FPN-ResNet18, 612->1224->2448
    python scripts/bench_engine.py --encoder resnet50 --arch FPN --size 2448 --repeat 2
    python scripts/bench_engine.py --config configs/pyramid256.yaml --size 2048
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from magseg.config import load_config  # noqa: E402
from magseg.segmenter import Segmenter  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "deepglobe.yaml"))
    parser.add_argument("--arch", default="FPN")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--size", type=int, default=2448, help="scene height and width in pixels")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs after one warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"model.arch={args.arch}", f"model.encoder={args.encoder}", "model.encoder_weights=none",
                 *args.overrides]
    config = load_config(args.config, overrides)
    segmenter = Segmenter.from_config(config)
    image = torch.randn(config.model.in_channels, args.size, args.size)

    segmenter.segment(image)  # warm-up: allocator, oneDNN kernels
    runs = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        result = segmenter.segment(image, return_stages=True)
        runs.append((time.perf_counter() - start, result))
    best_seconds, result = min(runs, key=lambda r: r[0])
    figures = {
        "scene": [args.size, args.size],
        "model": f"{config.model.arch}/{config.model.encoder}",
        "scales": [list(s) for s in config.pyramid.scales],
        "crop": list(config.pyramid.crop),
        "input": list(config.pyramid.input),
        "refine_points": config.refine.points,
        "median_kernel": config.refine.kernel,
        "seconds": round(best_seconds, 3),
        "seconds_all_runs": [round(r[0], 3) for r in runs],
        "stages": [
            {"size": list(s.size), "crops": s.crops_run, "seconds": round(s.seconds, 3),
             "refined_pixels": None if s.refined is None else int(s.refined.sum())}
            for s in result.stages
        ],
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    text = json.dumps(figures)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

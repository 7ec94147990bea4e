#!/usr/bin/env python
"""Does training run at the speed of its model, or wait for data? One JSON object on stdout.

For each phase (backbone, refiner) of ``--config`` on the training split of ``--data-root``,
with the DataLoader the trainer builds (its default workers, pinning and prefetching):

  loader_samples_per_s  the loader alone, iterated without a model (after its first batch,
                        which pays for starting workers);
  step_s                one training step as the trainer's loop runs it: the next batch from
                        the loader, forward, backward, optimiser step (median of --steps);
  pure_s                the same step on a batch already in memory ("pure forward +
                        backward"), so data work is left out; timed in turn with step_s,
                        one of each, so load from other work on the machine hits both;
  step_over_pure        step_s / pure_s: 1.0 when loading is hidden behind the model;
  model_samples_per_s   batch size / pure_s; loader_over_model is how much faster the
                        loader feeds than the model eats;
  setup_s               building the phase (models, loader, and whatever the trainer
                        prepares once per phase, e.g. caches).

Models have random weights (speed does not depend on them); the refiner phase freezes the
backbone built for the backbone phase. Run it against another checkout with
``PYTHONPATH=<checkout>``: the script imports whichever magseg comes first on the path.

    python scripts/make_synthetic.py --out /tmp/syn512 --size 512 --train 16 --val 2 --test 2
    python scripts/bench_train.py --config configs/demo.yaml --data-root /tmp/syn512
    python scripts/bench_train.py --config configs/deepglobe.yaml --data-root /tmp/syn2448 \\
        --set model.encoder_weights=none --steps 3 --loader-batches 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

# After PYTHONPATH, so that a checkout named there is the one measured.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from figures import report as report_figures  # noqa: E402

import magseg  # noqa: E402
from magseg.checkpoint import save_checkpoint  # noqa: E402
from magseg.config import load_config  # noqa: E402
from magseg.data.scenes import list_scenes  # noqa: E402
from magseg.segmenter import create_segmenter_model  # noqa: E402
from magseg.training import trainer as T  # noqa: E402
from magseg.training.backbone_phase import backbone_parts  # noqa: E402
from magseg.training.distributed import World  # noqa: E402
from magseg.training.phase import start_phase, train_step  # noqa: E402
from magseg.training.refiner_phase import refiner_parts  # noqa: E402
from magseg.training.resume import seed_everything  # noqa: E402
from magseg.training.state import BEST, RunPrecision, RunState, TrainOptions, TrainResult  # noqa: E402


def _step(run, batch, state) -> None:
    """The body of the trainer's epoch loop (magseg.training.phase.train_step)."""
    train_step(run, batch, state.config, state.precision)


def _measure(state: RunState, name: str, steps: int, loader_batches: int) -> dict:
    start = time.perf_counter()
    seed_everything(state.config.train.seed)
    parts = backbone_parts(state, None) if name == "backbone" else refiner_parts(state, None, None)
    run = start_phase(state, parts, None)
    setup = time.perf_counter() - start
    config = state.config
    batch_size = config.train.batch_size
    if len(run.loader) < max(steps, loader_batches) + 1:
        raise SystemExit(f"{name}: the loader has {len(run.loader)} batches; raise "
                         "train.samples_per_epoch or lower --steps/--loader-batches")

    # The loader alone.
    run.dataset.set_epoch(0)
    it = iter(run.loader)
    t0 = time.perf_counter()
    first = next(it)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(loader_batches):
        next(it)
    loader_s = time.perf_counter() - t0
    del it

    # Pure forward + backward on a batch in memory, and the trainer's loop, where each step
    # waits for its batch from the loader: interleaved, one of each in turn, so that a
    # machine shared with other work slows both alike (medians reported).
    _step(run, first, state)  # warm-up
    run.dataset.set_epoch(1)
    it = iter(run.loader)
    _step(run, next(it), state)  # warm-up, and the workers' start
    pure, loop = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        _step(run, first, state)
        pure.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _step(run, next(it), state)
        loop.append(time.perf_counter() - t0)
    del it

    pure_s, step_s = statistics.median(pure), statistics.median(loop)
    loader_rate = loader_batches * batch_size / loader_s
    model_rate = batch_size / pure_s
    return {
        "batch_size": batch_size,
        "num_workers": run.loader.num_workers,
        "setup_s": round(setup, 3),
        "loader_first_batch_s": round(first_s, 3),
        "loader_samples_per_s": round(loader_rate, 2),
        "step_s": round(step_s, 4),
        "pure_s": round(pure_s, 4),
        "step_over_pure": round(step_s / pure_s, 3),
        "model_samples_per_s": round(model_rate, 2),
        "loader_over_model": round(loader_rate / model_rate, 2),
    }, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    parser.add_argument("--loader-batches", type=int, default=8, help="batches timed for the loader")
    parser.add_argument("--phases", default="backbone,refiner")
    parser.add_argument("--out", default=None, help="scratch run directory (default: a temp dir)")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = load_config(args.config, args.set)
    out = Path(args.out) if args.out else Path("/tmp") / f"bench_train_{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    world = World()
    device = T._device(config, world)
    scenes = list_scenes(config.data, "train", args.data_root)
    config = T.compute_stats(config, scenes, world)
    state = RunState(config, TrainOptions(out=out, data_root=Path(args.data_root)), world, device,
                     RunPrecision.resolve(config, device), scenes, [], TrainResult(config))

    result: dict = {
        "magseg": str(Path(magseg.__file__).resolve().parents[1]),
        "config": args.config, "overrides": args.set, "scenes": len(scenes),
        "device": str(device), "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
    }
    phases = args.phases.split(",")
    backbone = None
    for name in phases:
        if name == "refiner":
            if backbone is None:
                backbone = create_segmenter_model(state.config, pretrained=False)
            save_checkpoint(out / BEST, state.config, backbone, None)
        figures, run = _measure(state, name, args.steps, args.loader_batches)
        if name == "backbone":
            backbone = run.backbone
        result[name] = figures
        print(f"{name}: {json.dumps(figures)}", file=sys.stderr, flush=True)
    shutil.rmtree(out, ignore_errors=True)
    report_figures(result)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Context margins (``pyramid.margin``) and the border term (``refine.border``) against the
seam score, mIoU and time, on a labelled split: each setting runs the progressive method and
patch-only on every image, settings interleaved image by image (on a shared machine, the
ratios of times measured side by side hold better than times taken minutes apart).

    python scripts/bench_margins.py demo_out/run/best.ckpt demo_out/data --margins 0,8,16,32 --borders 8,16

Per setting and method: mIoU (one confusion matrix over the split), the final labels' seam
score across each stage's crop borders (magseg.evaluation.seams), the backbone's pixels per
image pixel, and the median seconds per image. stdout: one JSON object (see figures.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from figures import report  # noqa: E402

from magseg.config import RefineConfig  # noqa: E402
from magseg.data.scenes import list_scenes, read_scene  # noqa: E402
from magseg.engine.pyramid import crop_boxes, grown_windows  # noqa: E402
from magseg.evaluation.benchmark import seam_tallies  # noqa: E402
from magseg.evaluation.metrics import ConfusionMatrix  # noqa: E402
from magseg.evaluation.seams import SeamTally  # noqa: E402
from magseg.segmenter import Segmenter  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in v.split(":")) for v in text.split(",") if v.strip()]


def backbone_pixels(pyramid, size) -> int:
    """Stage pixels the backbone reads for an image of ``size``, margins included (every
    crop of every stage)."""
    total = 0
    for stage in pyramid.stage_sizes(size):
        boxes = crop_boxes(stage, pyramid.crop)
        _, _, extent = grown_windows(boxes, pyramid.crop, stage, pyramid.margin_pixels)
        total += len(boxes) * extent[0] * extent[1]
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("data_root")
    parser.add_argument("--split", default="test")
    parser.add_argument("--margins", type=_ints, default=[0, 8, 16, 32], help="pyramid.margin values, stage pixels")
    parser.add_argument("--borders", type=_ints, default=[8, 16], help="refine.border values (with margin 0)")
    parser.add_argument("--both", type=_pairs, default=[], help="margin:border pairs, e.g. 16:8,32:8")
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    base = Segmenter.from_checkpoint(args.checkpoint, ["engine.precision=fp32"])
    config = base.config
    settings = [(m, 0) for m in args.margins] + [(0, b) for b in args.borders] + list(args.both)
    runs = {}
    for margin, border in settings:
        pyramid = dataclasses.replace(config.pyramid, margin=margin)
        refine = RefineConfig(points=config.refine.points, kernel=config.refine.kernel, border=border)
        runs[(margin, border)] = {"progressive": (pyramid, refine), "patch": (pyramid.patch_only(), refine)}
    in_mean = [c.in_mean for c in config.classes]
    tallies = {key: {name: {"matrix": ConfusionMatrix(config.num_classes, in_mean), "seconds": [],
                            "seams": [SeamTally() for _ in config.pyramid.scales]}
                     for name in methods} for key, methods in runs.items()}
    scenes = list_scenes(config.data, args.split, args.data_root)[: args.limit]
    size = None
    for i, scene in enumerate(scenes):
        image, mask = read_scene(scene, config)
        x = base.normalize(image)
        size = tuple(mask.shape)
        for key, methods in runs.items():
            for name, (pyramid, refine) in methods.items():
                if i == 0:  # one untimed run of each, as the benchmark warms up
                    base.segment(x, pyramid=pyramid, refine=refine)
                start = time.perf_counter()
                labels = base.segment(x, pyramid=pyramid, refine=refine).labels
                t = tallies[key][name]
                t["seconds"].append(time.perf_counter() - start)
                t["matrix"].update(labels, torch.from_numpy(mask))
                for tally, seam in zip(t["seams"], seam_tallies(labels.numpy(), config.pyramid)):
                    tally.merge(seam)
        print(f"bench_margins: {i + 1}/{len(scenes)} {scene.id}", file=sys.stderr, flush=True)
    rows = []
    for (margin, border), methods in runs.items():
        for name, (pyramid, _) in methods.items():
            t = tallies[(margin, border)][name]
            pixels = backbone_pixels(pyramid, size)
            rows.append({
                "margin": margin, "border": border, "method": name,
                "miou": round(100 * float(t["matrix"].scores()["miou"]), 2),
                "seam_scores": [None if s.score() is None else round(s.score(), 3) for s in t["seams"]],
                "backbone_pixels_per_pixel": round(pixels / (size[0] * size[1]), 3),
                "seconds_per_image": round(statistics.median(t["seconds"]), 4),
            })
    report({"checkpoint": args.checkpoint, "data_root": args.data_root, "split": args.split,
            "images": len(scenes), "threads": torch.get_num_threads(), "precision": "fp32",
            "scales": [list(s) for s in config.pyramid.scales], "crop": list(config.pyramid.crop),
            "K": config.refine.points, "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

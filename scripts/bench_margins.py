#!/usr/bin/env python
"""Context margins (``pyramid.margin``) and the border term (``refine.border``) against the
seam score, mIoU and time, on a labelled split, for one or more checkpoints: each runs the
progressive method and patch-only on every image with each setting, checkpoints and settings
interleaved image by image (on a shared machine, the ratios of times measured side by side
hold better than times taken minutes apart).

    python scripts/bench_margins.py demo_out/run/best.ckpt demo_out/data --margins 0,8,16,32 --borders 8,16
    python scripts/bench_margins.py base/best.ckpt@0:0 m16/best.ckpt@16:4,16:0,8:4 data --threads 1

A checkpoint written ``PATH@m:b,m:b`` runs those margin:border pairs only; a plain ``PATH``
runs ``--margins`` (border 0), ``--borders`` (margin 0) and ``--both``. A model trained with a
margin stores it in its config: ``@16:4`` on it is its own setting.

Per checkpoint, setting and method: mIoU (one confusion matrix over the split), the final
labels' seam score across each stage's crop borders (magseg.evaluation.seams), with
``--uncertainty`` the uncertainty map's too, the backbone's
stage pixels per image pixel, the median seconds per image, and that median over the first
row's (``time_ratio``). Patch-only has no refinement, so the border term does not change it:
it runs once per checkpoint and margin. stdout: one JSON object (see figures.py).
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

from magseg.data.scenes import list_scenes, read_scene  # noqa: E402
from magseg.engine.pyramid import crop_boxes, grown_windows  # noqa: E402
from magseg.evaluation.benchmark import seam_tallies  # noqa: E402
from magseg.evaluation.metrics import ConfusionMatrix  # noqa: E402
from magseg.evaluation.seams import SeamTally, line_changes, line_period, pyramid_border_lines  # noqa: E402
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


def band_edge_tallies(labels, pyramid, border: int) -> list[SeamTally]:
    """Per stage, the changes across the lines ``border`` stage pixels either side of each
    crop border (the crop borders themselves when ``border`` is 0): with the border term the
    pixels within ``border`` of a crop border keep the coarser stage's answer, so a seam
    between it and the refined answer would lie on these lines, where the seam score of the
    borders does not look."""
    changes = line_changes(labels)
    (h, w), tallies = labels.shape, []
    period = line_period(pyramid.scales, (h, w), pyramid.scene)
    for size, (rows, cols) in zip(pyramid.stage_sizes((h, w)),
                                  pyramid_border_lines(pyramid.scales, pyramid.crop, (h, w), pyramid.scene)):
        dy, dx = round(border * h / size[0]), round(border * w / size[1])
        shifted = ([r + s for r in rows for s in {-dy, dy} if 0 < r + s < h],
                   [c + s for c in cols for s in {-dx, dx} if 0 < c + s < w])
        tally = SeamTally()
        tally.add(changes, *shifted, period)
        tallies.append(tally)
    return tallies


@dataclasses.dataclass
class Tally:
    """One checkpoint, setting and method over the split."""

    matrix: ConfusionMatrix
    seams: list[SeamTally]
    band_edges: list[SeamTally]
    uncertainty: list[SeamTally]
    seconds: list[float] = dataclasses.field(default_factory=list)


def _settings(spec: str, args: argparse.Namespace) -> tuple[str, list[tuple[int, int]]]:
    path, at, pairs = spec.rpartition("@") if "@" in spec else (spec, "", "")
    if at:
        return path, _pairs(pairs)
    return spec, [(m, 0) for m in args.margins] + [(0, b) for b in args.borders] + list(args.both)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", metavar="checkpoint", help="PATH or PATH@margin:border,...")
    parser.add_argument("data_root")
    parser.add_argument("--split", default="test")
    parser.add_argument("--margins", type=_ints, default=[0, 8, 16, 32], help="pyramid.margin values, stage pixels")
    parser.add_argument("--borders", type=_ints, default=[8, 16], help="refine.border values (with margin 0)")
    parser.add_argument("--both", type=_pairs, default=[], help="margin:border pairs, e.g. 16:8,32:8")
    parser.add_argument("--no-patch", action="store_true", help="the progressive method only")
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--uncertainty", action="store_true",
                        help="also the seam score of the uncertainty map (1 - certainty); every run then "
                             "returns probabilities, so its times are of that path")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every checkpoint, e.g. engine.compiled=on (repeatable)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    models = []  # (path, segmenter, [(margin, border, progressive pyramid, refine, patch pyramid)])
    for spec in args.checkpoints:
        path, pairs = _settings(spec, args)
        seg = Segmenter.from_checkpoint(path, ["engine.precision=fp32", *args.set])
        config = seg.config
        runs = []
        for margin, border in pairs:
            pyramid = dataclasses.replace(config.pyramid, margin=margin)
            runs.append((margin, border, pyramid, dataclasses.replace(config.refine, border=border),
                         pyramid.patch_only()))
        models.append((path, seg, runs))
    config = models[0][1].config
    in_mean = [c.in_mean for c in config.classes]

    def tally(stages: int) -> Tally:
        return Tally(ConfusionMatrix(config.num_classes, in_mean), [SeamTally() for _ in range(stages)],
                     [SeamTally() for _ in range(stages)], [SeamTally() for _ in range(stages)])

    # progressive per (model, margin, border); patch-only per (model, margin).
    prog = {(i, m, b): tally(len(config.pyramid.scales)) for i, (_, _, runs) in enumerate(models)
            for m, b, *_ in runs}
    patch = {(i, m): tally(len(config.pyramid.scales)) for i, (_, _, runs) in enumerate(models)
             for m, *_ in runs}
    scenes = list_scenes(config.data, args.split, args.data_root)[: args.limit]
    size = None
    for n, scene in enumerate(scenes):
        image, mask = read_scene(scene, config)
        target = torch.from_numpy(mask)
        size = tuple(mask.shape)
        done_patch = set()
        for i, (_, seg, runs) in enumerate(models):
            x = seg.normalize(image)
            for margin, border, pyramid, refine, patch_pyramid in runs:
                jobs = [(prog[(i, margin, border)], pyramid)]
                if not args.no_patch and (i, margin) not in done_patch:
                    done_patch.add((i, margin))
                    jobs.append((patch[(i, margin)], patch_pyramid))
                for t, pyr in jobs:
                    band = border if pyr is pyramid else 0
                    if n == 0:  # one untimed run of each, as the benchmark warms up
                        seg.segment(x, pyramid=pyr, refine=refine)
                    start = time.perf_counter()
                    result = seg.segment(x, pyramid=pyr, refine=refine, return_probs=args.uncertainty)
                    t.seconds.append(time.perf_counter() - start)
                    labels = result.labels
                    if args.uncertainty:
                        uncertainty = (1 - result.certainty).numpy()
                        for total, seam in zip(t.uncertainty, seam_tallies(uncertainty, seg.config.pyramid,
                                                                           continuous=True)):
                            total.merge(seam)
                    t.matrix.update(labels, target)
                    # Every method is scored on the checkpoint's own grids.
                    for total, seam in zip(t.seams, seam_tallies(labels.numpy(), seg.config.pyramid)):
                        total.merge(seam)
                    for total, seam in zip(t.band_edges, band_edge_tallies(labels.numpy(), seg.config.pyramid, band)):
                        total.merge(seam)
        print(f"bench_margins: {n + 1}/{len(scenes)} {scene.id}", file=sys.stderr, flush=True)

    rows = []
    for i, (path, seg, runs) in enumerate(models):
        for margin, border, pyramid, _, patch_pyramid in runs:
            methods = [("progressive", prog[(i, margin, border)], pyramid)]
            if not args.no_patch:
                methods.append(("patch", patch[(i, margin)], patch_pyramid))
            for method, t, pyr in methods:
                rows.append({
                    "checkpoint": path, "K": seg.config.refine.points, "refiner": seg.refiner is not None,
                    "margin": margin, "border": border, "method": method,
                    "miou": round(100 * float(t.matrix.scores()["miou"]), 2),
                    "seam_scores": [None if s.score() is None else round(s.score(), 3) for s in t.seams],
                    "band_edge_seam_scores": [None if s.score() is None else round(s.score(), 3)
                                              for s in t.band_edges],
                    "uncertainty_seam_scores": ([None if s.score() is None else round(s.score(), 3)
                                                for s in t.uncertainty] if args.uncertainty else None),
                    "backbone_pixels_per_pixel": round(backbone_pixels(pyr, size) / (size[0] * size[1]), 3),
                    "seconds_per_image": round(statistics.median(t.seconds), 4),
                })
    for row in rows:
        row["time_ratio"] = round(row["seconds_per_image"] / rows[0]["seconds_per_image"], 3)
    report({"data_root": args.data_root, "split": args.split, "images": len(scenes),
            "threads": torch.get_num_threads(), "precision": "fp32",
            "scales": [list(s) for s in config.pyramid.scales], "crop": list(config.pyramid.crop),
            "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

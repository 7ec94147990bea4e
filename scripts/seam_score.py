#!/usr/bin/env python
"""The seam score of any class map (or uncertainty raster) across each stage's crop borders
(magseg.evaluation.seams): 1.0 means the crop grid is invisible.

    python scripts/seam_score.py out/scene.labels.tif --checkpoint run/best.ckpt
    python scripts/seam_score.py map.tif --scales 128,256,512 --crop 128
    python scripts/seam_score.py out/scene.uncertainty.tif --checkpoint run/best.ckpt --continuous

The grid of each stage is the one the engine cuts for a map of this size: stage sizes from
the pyramid's scales (and scene size) as ``magseg.engine.pyramid.stage_sizes`` gives them,
crops of ``--crop``, their owned borders mapped to the map. Pixels equal to the raster's
nodata value (or ``--nodata``) are left out.

stdout: one JSON object: the map, its size and ``stages``: per stage its size and score
(null for a stage of one crop). Exit 2 on bad arguments, 1 when the map cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _pyramid(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """(scales, crop, scene) from the checkpoint or the flags."""
    if args.checkpoint:
        from magseg.checkpoint import load_checkpoint

        p = load_checkpoint(args.checkpoint).config.pyramid
        return p.scales, p.crop, p.scene
    if not args.scales or not args.crop:
        parser.error("give --checkpoint, or --scales and --crop")
    scales = [(s, s) for s in args.scales]
    crop = (args.crop, args.crop)
    return scales, crop, scales[-1] if args.scene is None else (args.scene, args.scene)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("map", help="class map or uncertainty raster (GeoTIFF or any raster GDAL reads)")
    parser.add_argument("--checkpoint", help="take scales, crop and scene size from this checkpoint")
    parser.add_argument("--scales", type=_ints, help="stage sizes coarse to fine, e.g. 128,256,512")
    parser.add_argument("--crop", type=int, help="crop size (stage pixels)")
    parser.add_argument("--scene", type=int, default=None, help="scene size the scales are for (default: the last)")
    parser.add_argument("--continuous", action="store_true",
                        help="absolute differences (uncertainty), not label changes")
    parser.add_argument("--nodata", type=int, default=None, help="value to leave out (default: the raster's nodata)")
    parser.add_argument("--band", type=int, default=1)
    args = parser.parse_args(argv)

    from magseg.errors import MagsegError
    from magseg.evaluation.seams import stage_seam_scores
    from magseg.io.raster import open_raster

    try:
        scales, crop, scene = _pyramid(args, parser)
        with open_raster(args.map) as src:
            values = src.read(args.band)
            nodata = args.nodata if args.nodata is not None else src.nodata
    except MagsegError as exc:
        print(f"seam_score: {exc}", file=sys.stderr)
        return 1
    ignore = None if nodata is None or args.continuous else int(nodata)
    scores = stage_seam_scores(np.asarray(values), scales, crop, scene, continuous=args.continuous, ignore=ignore)
    from magseg.engine.pyramid import stage_sizes

    sizes = stage_sizes(tuple(tuple(s) for s in scales), values.shape, scene)
    print(json.dumps({"map": args.map, "size": list(values.shape), "crop": list(crop),
                      "stages": [{"size": list(s), "seam_score": None if v is None else round(v, 4)}
                                 for s, v in zip(sizes, scores)]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

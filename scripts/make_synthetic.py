#!/usr/bin/env python
"""Write a synthetic land-cover dataset in the DeepGlobe layout (see scripts/synthetic.py).

    <out>/<id>_sat.jpg   RGB image          <out>/train.txt  ids, one per line
    <out>/<id>_mask.png  RGB class colours  <out>/val.txt, <out>/test.txt

Scenes need context (fields that look alike up close and differ by their margins) and detail
(rivers and tracks 2-4 px wide that vanish when the scene is downsampled 4x). The same
--seed gives byte-identical files; scene i depends only on the seed and i.

    python scripts/make_synthetic.py --out data/synthetic                  # 2448 px, 20/5/10 scenes
    python scripts/make_synthetic.py --out data/small --size 512 --train 60 --val 6 --test 12 --seed 3
    python scripts/make_synthetic.py --out data/odd --size 300x500 --cells 6
    python scripts/make_synthetic.py --out data/buildings --size 512 --small-objects   # 4-30 px buildings
    python scripts/make_synthetic.py --out data/quick --size 512 --geotiff   # + <out>/geotiff/<id>.tif

With --geotiff the test scenes are also written as GeoTIFFs with a CRS (UTM 33N, 0.5 m
pixels) under <out>/geotiff/, to try `magseg predict` on what it is made for.

stdout: one JSON line (root, ids per split, the scene settings); progress on stderr.
Exit 0 done, 1 outputs exist (without --overwrite), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from synthetic import SceneSpec, write_dataset  # noqa: E402
from magseg.errors import MagsegError  # noqa: E402


def _size(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not N or HxW") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"size {text!r} is not N or HxW")
    return parts[0], parts[1]


def write_geotiff(jpeg: Path, target: Path) -> None:
    """A JPEG scene as a tiled 3-band GeoTIFF with a real CRS (what `magseg predict` takes):
    UTM zone 33N, 0.5 m pixels."""
    import rasterio
    from rasterio.transform import from_origin

    from magseg.io.atomic import atomic_write
    from magseg.io.raster import read_array

    pixels = read_array(jpeg)
    profile = dict(driver="GTiff", width=pixels.shape[2], height=pixels.shape[1], count=pixels.shape[0],
                   dtype="uint8", crs="EPSG:32633", transform=from_origin(500000.0, 4650000.0, 0.5, 0.5),
                   tiled=True, blockxsize=256, blockysize=256, compress="deflate")
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target, overwrite=True) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(pixels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="dataset root to write")
    parser.add_argument("--size", type=_size, default=(2448, 2448), help="scene size N or HxW (default 2448)")
    parser.add_argument("--train", type=int, default=20, help="scenes in train.txt (default 20)")
    parser.add_argument("--val", type=int, default=5, help="scenes in val.txt (default 5)")
    parser.add_argument("--test", type=int, default=10, help="scenes in test.txt (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cells", type=int, default=SceneSpec.cells, help="land units per scene")
    parser.add_argument("--rim", type=float, default=SceneSpec.rim,
                        help="field margin width, fraction of the scene's shorter side")
    parser.add_argument("--small-objects", action="store_true",
                        help="urban is only small buildings (4-30 px, 2-5 %% of the pixels), told by "
                             "their own look, not by context")
    parser.add_argument("--jpeg-quality", type=int, default=95)
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")
    parser.add_argument("--geotiff", action="store_true",
                        help="also write the test scenes as georeferenced GeoTIFFs in <out>/geotiff/")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)

    try:
        spec = SceneSpec(size=args.size, cells=args.cells, rim=args.rim,
                         small_objects=(0.02, 0.05) if args.small_objects else None)
    except ValueError as exc:
        parser.error(str(exc))
    total = args.train + args.val + args.test
    done = 0
    start = time.perf_counter()

    def progress(split: str, sid: str) -> None:
        nonlocal done
        done += 1
        if not args.quiet:
            print(f"\r{done}/{total} scenes ({split} {sid})", end="", file=sys.stderr, flush=True)

    try:
        ids = write_dataset(args.out, {"train": args.train, "val": args.val, "test": args.test},
                            spec, args.seed, jpeg_quality=args.jpeg_quality,
                            overwrite=args.overwrite, on_scene=progress)
    except ValueError as exc:
        parser.error(str(exc))
    except MagsegError as exc:
        print(f"make_synthetic: error: {exc}", file=sys.stderr)
        return 1
    if args.geotiff:
        for sid in ids["test"]:
            write_geotiff(args.out / f"{sid}_sat.jpg", args.out / "geotiff" / f"{sid}.tif")
    if not args.quiet:
        print(f"\rwrote {total} scenes to {args.out} in {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
    print(json.dumps({"root": str(args.out), "seed": args.seed, "ids": ids,
                      "spec": dataclasses.asdict(spec)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

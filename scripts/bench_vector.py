#!/usr/bin/env python
"""Polygonising a large class map: wall time and peak resident memory, as JSON.

Writes a synthetic class map of --size² (7 classes: smooth blobs of ~100 px plus 3 px lines
every 500 px, a UTM CRS, tiled and compressed as predict writes it), then polygonises it into
a GeoPackage with magseg.io.vector in a child process, so that the peak memory is the
polygonisation's alone. ``imports_rss_mb`` is the peak of a child that only imports
magseg.io.vector (importing magseg loads torch): the polygonisation's own memory is the
difference.

    python scripts/bench_vector.py --size 16384 --json vector.json
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from figures import report as report_figures

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import resource, sys
from magseg.io.vector import VectorOptions, polygonize
imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
summary = polygonize(sys.argv[1], sys.argv[2], [f"class{i}" for i in range(7)], VectorOptions())
print(summary.polygons, imports, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_class_map(path: Path, size: int, seed: int = 0) -> None:
    """Blobs from a bilinearly upsampled random field, cut into 7 classes, plus thin lines;
    written strip by strip (memory stays small whatever ``size``)."""
    import cv2
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rng = np.random.default_rng(seed)
    cells = max(2, size // 100)
    field = rng.random((cells + 1, cells + 1)).astype(np.float32)
    profile = dict(driver="GTiff", height=size, width=size, count=1, dtype="uint8", nodata=255,
                   crs="EPSG:32633", transform=from_origin(500000, 4000000, 0.5, 0.5), tiled=True,
                   blockxsize=256, blockysize=256, compress="deflate", BIGTIFF="IF_SAFER")
    rows = 1024
    scale = cells / size
    with rasterio.open(path, "w", **profile) as dst:
        for top in range(0, size, rows):
            h = min(rows, size - top)
            ys = (np.arange(top, top + h, dtype=np.float32) + 0.5) * scale
            xs = (np.arange(size, dtype=np.float32) + 0.5) * scale
            mapx, mapy = np.meshgrid(xs, ys)
            strip = cv2.remap(field, mapx, mapy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            labels = np.minimum(strip * 6, 5).astype(np.uint8)
            labels[:, np.arange(size) % 500 < 3] = 6
            labels[(np.arange(top, top + h) % 500 < 3)] = 6
            dst.write(labels, 1, window=Window(0, top, size, h))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="magseg-bench-vector-") as tmp:
        labels, out = Path(tmp) / "labels.tif", Path(tmp) / "labels.gpkg"
        write_class_map(labels, args.size)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", CHILD, str(labels), str(out)], cwd=REPO,
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(done.stderr)
        polygons, imports_kb, peak_kb = map(int, done.stdout.split()[-3:])
        figures = {
            "size": args.size, "polygons": polygons, "wall_s": round(wall, 2),
            "peak_rss_mb": round(peak_kb / 1024, 1), "imports_rss_mb": round(imports_kb / 1024, 1),
            "gpkg_mb": round(out.stat().st_size / 2**20, 1),
            "labels_mb": round(labels.stat().st_size / 2**20, 1), "machine": platform.machine(),
        }
    report_figures(figures, args.json)


if __name__ == "__main__":
    main()

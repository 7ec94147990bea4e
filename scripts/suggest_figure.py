#!/usr/bin/env python
"""The picture of `magseg suggest`'s windows over the uncertainty maps they were chosen from.

    python scripts/suggest_figure.py to_label.gpkg --predictions pred/ --out docs/img/suggest.png

One panel per raster that has a chosen window (at most --rasters, most chosen windows
first): its `<stem>_uncertainty.tif` from --predictions (as `magseg predict --uncertainty`
wrote it), with each window outlined and numbered by rank. Prints one JSON line: the file
written and the windows drawn per raster.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyogrio.raw
import rasterio

from magseg.io.atomic import atomic_write
from magseg.io.suggest import LAYER


def _windows(gpkg: Path) -> list[dict]:
    meta, _, _, values = pyogrio.raw.read(gpkg, layer=LAYER)
    columns = dict(zip(meta["fields"], values))
    return [{k: columns[k][i] for k in ("rank", "raster", "row", "col", "height", "width")}
            for i in range(len(columns["rank"]))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gpkg", type=Path, help="what `magseg suggest` wrote")
    parser.add_argument("--predictions", type=Path, required=True, help="where predict wrote <stem>_uncertainty.tif")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--rasters", type=int, default=4, help="panels at most")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    windows = _windows(args.gpkg)
    order = [r for r, _ in Counter(w["raster"] for w in windows).most_common(args.rasters)]
    fig, axes = plt.subplots(1, len(order), figsize=(2.6 * len(order), 2.9), squeeze=False)
    for ax, raster in zip(axes[0], order):
        with rasterio.open(args.predictions / f"{Path(raster).stem}_uncertainty.tif") as src:
            uncertainty = src.read(1).astype(np.float32) / 255
        ax.imshow(uncertainty, cmap="magma", vmin=0, vmax=1)
        for w in (w for w in windows if w["raster"] == raster):
            ax.add_patch(Rectangle((w["col"], w["row"]), w["width"], w["height"], fill=False,
                                   edgecolor="cyan", linewidth=1.2))
            ax.text(w["col"] + 3, w["row"] + 3, str(w["rank"]), color="cyan", fontsize=7, va="top")
        ax.set_title(Path(raster).name, fontsize=8)
        ax.axis("off")
    fig.suptitle("windows to label (rank) over uncertainty (1 - certainty)", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out) as tmp:
        tmp.write_bytes(buf.getvalue())
    print(json.dumps({"out": str(args.out), "windows": {Path(r).name: sum(w["raster"] == r for w in windows)
                                                        for r in order}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The seam score of a prediction's outputs, for its record: the finest stage's crop
borders on the written class map and uncertainty raster (magseg.evaluation.seams), read
back in strips of rows, so a raster of any size is scored in a strip's memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from magseg.config import PyramidConfig
from magseg.engine.pyramid import Size
from magseg.evaluation.seams import SeamTally, StripChanges, crop_border_lines, line_period
from magseg.io.raster import NODATA, open_raster

STRIP_ROWS = 512


def finest_seam_scores(labels: Path, uncertainty: Path | None, size: Size, pyramid: PyramidConfig,
                       strip: int = STRIP_ROWS, whole: tuple[Size, Size] | None = None) -> dict[str, Any]:
    """``{"stage": [h, w], "labels": score, "uncertainty": score}`` for the finest stage's
    crop grid on the outputs of an image of ``size`` (None: a stage of one crop, or no
    uncertainty raster). Nodata pixels of the class map are left out of both. ``whole``:
    ``(raster size, origin)`` when the outputs are a clip of a larger raster at ``origin``
    (the grid is the whole raster's)."""
    full, (r0, c0) = whole if whole is not None else (tuple(size), (0, 0))
    stage = pyramid.stage_sizes(tuple(full))[-1]
    rows, cols = crop_border_lines(stage, pyramid.crop, tuple(full))
    period = line_period(pyramid.scales, tuple(full), pyramid.scene)
    rows = [r - r0 for r in rows if 0 < r - r0 < size[0]]
    cols = [c - c0 for c in cols if 0 < c - c0 < size[1]]
    out: dict[str, Any] = {"stage": list(stage), "labels": None, "uncertainty": None}
    if not rows and not cols:
        return out
    width = size[1]
    label_lines = StripChanges(width, ignore=NODATA)
    unc_lines = StripChanges(width, continuous=True) if uncertainty is not None else None
    with open_raster(labels) as lab:
        unc = open_raster(uncertainty) if uncertainty is not None else None
        try:
            for top in range(0, size[0], strip):
                n = min(strip, size[0] - top)
                window = ((top, top + n), (0, width))
                values = lab.read(1, window=window)
                label_lines.add(values)
                if unc is not None:
                    unc_lines.add(unc.read(1, window=window).astype(np.float64) / 255, values == NODATA)
        finally:
            if unc is not None:
                unc.close()
    for key, lines in (("labels", label_lines), ("uncertainty", unc_lines)):
        if lines is not None:
            tally = SeamTally()
            tally.add(lines.changes(), rows, cols, period)
            score = tally.score()
            out[key] = None if score is None else round(score, 4)
    return out

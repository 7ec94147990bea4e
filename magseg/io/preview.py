"""A quick-look PNG of a prediction: image | classes | uncertainty, side by side, downsampled.

The canvas is filled window by window while a raster is predicted, by nearest-neighbour
sampling at the preview's pixel centres, so a preview of a huge raster costs neither a second
read of it nor more memory than the picture itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from magseg.config import ClassSpec
from magseg.io.raster import NODATA, PixelWindow

# Shown where the input has no data.
_NODATA_RGB = (0.85, 0.85, 0.85)


class PreviewCanvas:
    """Samples of a raster of ``size`` (H, W) at most ``max_side`` px on its longer side."""

    def __init__(self, size: tuple[int, int], max_side: int = 512):
        step = max(1, math.ceil(max(size) / max_side))
        # Centres of step x step blocks: the preview pixel (i, j) shows raster pixel
        # (rows[i], cols[j]).
        self.rows = np.arange(step // 2, size[0], step)
        self.cols = np.arange(step // 2, size[1], step)
        shape = (len(self.rows), len(self.cols))
        self.image = np.zeros((3, *shape), np.float32)
        self.labels = np.full(shape, NODATA, np.uint8)
        self.uncertainty = np.zeros(shape, np.float32)

    def add(
        self,
        core: PixelWindow,
        pixels: np.ndarray,
        labels: np.ndarray,
        uncertainty: np.ndarray | None,
        valid: np.ndarray,
    ) -> None:
        """Take the samples that fall in ``core``.

        Args:
            pixels: ``(C, h, w)`` raw input pixels of the core (the first three bands are
                shown as RGB, a single band as grey).
            labels: ``(h, w)`` class ids; uncertainty: ``(h, w)`` uint8; valid: ``(h, w)`` bool.
        """
        ri = np.flatnonzero((self.rows >= core.row) & (self.rows < core.row + core.height))
        ci = np.flatnonzero((self.cols >= core.col) & (self.cols < core.col + core.width))
        if not len(ri) or not len(ci):
            return
        r, c = np.ix_(self.rows[ri] - core.row, self.cols[ci] - core.col)
        at = np.ix_(ri, ci)
        bands = pixels[:3] if pixels.shape[0] >= 3 else np.repeat(pixels[:1], 3, axis=0)
        ok = valid[r, c]
        for b in range(3):
            self.image[b][at] = np.where(ok, bands[b][r, c], np.nan)
        self.labels[at] = labels[r, c]
        if uncertainty is not None:
            self.uncertainty[at] = np.where(ok, uncertainty[r, c] / 255.0, np.nan)

    def image_rgb(self) -> np.ndarray:
        """``(h, w, 3)`` in [0, 1]: each band stretched between its 2nd and 98th percentile
        (uint16 and float images are unreadable unstretched)."""
        out = np.empty((*self.labels.shape, 3), np.float32)
        for b in range(3):
            band = self.image[b]
            finite = band[np.isfinite(band)]
            lo, hi = np.percentile(finite, (2, 98)) if finite.size else (0.0, 1.0)
            out[..., b] = np.clip((band - lo) / max(hi - lo, 1e-12), 0, 1)
        out[~np.isfinite(self.image).all(axis=0)] = _NODATA_RGB
        return out

    def labels_rgb(self, classes: Sequence[ClassSpec]) -> np.ndarray:
        """``(h, w, 3)`` class colours in [0, 1]; nodata grey."""
        palette = np.tile(np.array(_NODATA_RGB, np.float32), (256, 1))
        for c in classes:
            palette[c.id] = np.array(c.color, np.float32) / 255
        return palette[self.labels]

    def save(self, path: str | Path, classes: Sequence[ClassSpec], title: str = "",
             metadata: Mapping[str, str] | None = None) -> None:
        """Render the three panels and a class legend to a PNG at ``path``; ``metadata``:
        text chunks (what made it: magseg.io.provenance tags)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch

        h, w = self.labels.shape
        # About one screen pixel per preview pixel, plus room for titles and the legend.
        fig_w, fig_h = max(3 * w / 100, 6), max(h / 100, 2) + 1.0
        fig, axes = plt.subplots(1, 3, figsize=(fig_w, fig_h), dpi=100, layout="constrained")
        try:
            cmap = matplotlib.colormaps["magma"].with_extremes(bad=_NODATA_RGB)
            panels = [
                ("image", self.image_rgb(), {}),
                ("classes", self.labels_rgb(classes), {"interpolation": "nearest"}),
                ("uncertainty (1 - certainty)", np.ma.masked_invalid(self.uncertainty),
                 {"cmap": cmap, "vmin": 0, "vmax": 1, "interpolation": "nearest"}),
            ]
            for ax, (name, data, kwargs) in zip(axes, panels):
                ax.imshow(data, **kwargs)
                ax.set_title(name, fontsize=9)
                ax.set_axis_off()
            handles = [Patch(facecolor=np.array(c.color) / 255, edgecolor="k", label=c.name)
                       for c in classes]
            fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8),
                       fontsize=8, frameon=False)
            if title:
                fig.suptitle(title, fontsize=10)
            fig.savefig(path, format="png", metadata=dict(metadata or {}))
        finally:
            plt.close(fig)

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
from magseg.geometry import Rect
from magseg.io.raster import NODATA, VALUE_MAX

# Shown where the input has no data.
_NODATA_RGB = (0.85, 0.85, 0.85)

# The layout, in inches (the figure is drawn at 100 dpi). Panels keep the raster's aspect;
# each sits in a slot at least _MIN_SLOT wide so that its title fits above a narrow one.
_PAD, _GAP, _SUPTITLE, _PANEL_TITLE = 0.1, 0.15, 0.25, 0.25
_MIN_SLOT = 0.95
_BAR, _BAR_LABELS = 0.12, 0.45  # colour bar thickness, room for its tick labels and name
_DPI = 100


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
        core: Rect,
        pixels: np.ndarray,
        labels: np.ndarray,
        uncertainty: np.ndarray | None,
        valid: np.ndarray,
    ) -> None:
        """Take the samples that fall in ``core``.

        Args:
            pixels: ``(C, h, w)`` raw input pixels of the core (the first three bands are
                shown as RGB, a single band as grey).
            labels: ``(h, w)`` class ids; uncertainty: ``(h, w)`` uint8, (1 - certainty) x
                ``VALUE_MAX``; valid: ``(h, w)`` bool.
        """
        ri = np.flatnonzero((self.rows >= core.top) & (self.rows < core.bottom))
        ci = np.flatnonzero((self.cols >= core.left) & (self.cols < core.right))
        if not len(ri) or not len(ci):
            return
        r, c = np.ix_(self.rows[ri] - core.top, self.cols[ci] - core.left)
        at = np.ix_(ri, ci)
        bands = pixels[:3] if pixels.shape[0] >= 3 else np.repeat(pixels[:1], 3, axis=0)
        ok = valid[r, c]
        for b in range(3):
            self.image[b][at] = np.where(ok, bands[b][r, c], np.nan)
        self.labels[at] = labels[r, c]
        if uncertainty is not None:
            self.uncertainty[at] = np.where(ok, uncertainty[r, c] / VALUE_MAX, np.nan)

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

    def figure(self, classes: Sequence[ClassSpec], title: str = ""):
        """The three panels, the uncertainty's colour bar and the class legend as a
        matplotlib Figure, laid out for this raster's shape (see ``PreviewLayout``)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch

        layout = PreviewLayout(self.labels.shape, bool(title))
        fig = Figure(figsize=(layout.width, layout.height), dpi=_DPI)
        FigureCanvasAgg(fig)  # no pyplot: nothing global to close, safe in worker threads
        cmap = matplotlib.colormaps["magma"].with_extremes(bad=_NODATA_RGB)
        panels = [
            ("image", self.image_rgb(), {}),
            ("classes", self.labels_rgb(classes), {"interpolation": "nearest"}),
            ("uncertainty", np.ma.masked_invalid(self.uncertainty),
             {"cmap": cmap, "vmin": 0, "vmax": 1, "interpolation": "nearest"}),
        ]
        shown = None
        for (name, data, kwargs), rect in zip(panels, layout.panels):
            ax = fig.add_axes(rect)
            shown = ax.imshow(data, aspect="auto", **kwargs)
            ax.set_title(name, fontsize=9, pad=3)
            ax.set_axis_off()
        bar = fig.colorbar(shown, cax=fig.add_axes(layout.bar), orientation=layout.bar_orientation,
                           ticks=[0, 0.5, 1])
        bar.set_label("1 - certainty", fontsize=8)
        bar.ax.tick_params(labelsize=7)
        handles = [Patch(facecolor=np.array(c.color) / 255, edgecolor="k", label=c.name) for c in classes]
        if (self.labels == NODATA).any():
            handles.append(Patch(facecolor=_NODATA_RGB, edgecolor="k", label="nodata"))
        layout.place_legend(fig, handles)
        if title:
            fig.suptitle(title, fontsize=10, y=1 - _PAD / layout.height, va="top")
        return fig

    def save(self, path: str | Path, classes: Sequence[ClassSpec], title: str = "",
             metadata: Mapping[str, str] | None = None) -> None:
        """Render the three panels, a colour bar and a class legend to a PNG at ``path``;
        ``metadata``: text chunks (what made it: magseg.io.provenance tags)."""
        self.figure(classes, title).savefig(path, format="png", metadata=dict(metadata or {}))


class PreviewLayout:
    """Where the panels, the colour bar and the legend of a preview of ``(h, w)`` pixels go.

    Rasters at least twice as wide as high stack their panels (a strip side by side would be
    mostly empty figure); others stand them side by side. A panel keeps the raster's aspect
    and is about one inch per 100 preview pixels, within bounds that keep a 20 px raster
    visible and a 512 px one on a screen. The colour bar sits right of the uncertainty
    panel (below it when stacked); the legend goes below everything, in as many columns as
    fit the figure's width (``place_legend`` measures its text and grows the figure to it),
    so no text ends outside the canvas at any shape.

    Rectangles are matplotlib's ``(left, bottom, width, height)`` in figure fractions.
    """

    def __init__(self, size: tuple[int, int], title: bool) -> None:
        h, w = size
        self.stacked = w >= 2 * h
        if self.stacked:
            pw = min(max(w / 100, 4.0), 8.0)
            ph = pw * h / w
            if ph > 2.5:
                ph, pw = 2.5, 2.5 * w / h
            slot_w, slot_h = pw, ph + _PANEL_TITLE
        else:
            ph = min(max(h / 100, 1.8), 4.0)
            pw = ph * w / h
            if pw > 4.0:
                pw, ph = 4.0, 4.0 * h / w
            slot_w, slot_h = max(pw, _MIN_SLOT), ph + _PANEL_TITLE
        top = _PAD + (_SUPTITLE if title else 0.0)
        # Boxes in inches from the top-left corner: (left, top, width, height).
        boxes = []
        for k in range(3):
            left = _PAD + (0 if self.stacked else k * (slot_w + _GAP)) + (slot_w - pw) / 2
            y = top + (k * (slot_h + _GAP) if self.stacked else 0) + _PANEL_TITLE
            boxes.append((left, y, pw, ph))
        last = boxes[-1]
        if self.stacked:
            bar_w = min(pw, 3.0)
            self._bar = (last[0] + (pw - bar_w) / 2, last[1] + ph + 0.08, bar_w, _BAR)
            self.bar_orientation = "horizontal"
            self.width = 2 * _PAD + slot_w
            self._legend_top = self._bar[1] + _BAR + _BAR_LABELS
        else:
            bar_h = max(ph, 0.8)
            self._bar = (last[0] + pw + 0.08, last[1] + (ph - bar_h) / 2, _BAR, bar_h)
            self.bar_orientation = "vertical"
            self.width = 2 * _PAD + 3 * slot_w + 2 * _GAP + max(0.0, (pw - slot_w) / 2 + 0.08 + _BAR
                                                                 + _BAR_LABELS)
            self._legend_top = top + _PANEL_TITLE + max(ph, 0.8) + _GAP
        self._boxes = boxes
        self.height = self._legend_top + _PAD  # grows by the legend's height

    def _rect(self, box: tuple[float, float, float, float]) -> list[float]:
        left, top, w, h = box
        return [left / self.width, 1 - (top + h) / self.height, w / self.width, h / self.height]

    @property
    def panels(self) -> list[list[float]]:
        return [self._rect(b) for b in self._boxes]

    @property
    def bar(self) -> list[float]:
        return self._rect(self._bar)

    def place_legend(self, fig, handles) -> None:
        """Add the legend below the panels in as many columns as fit, growing the figure
        (and moving what is already on it) to hold it."""
        renderer = fig.canvas.get_renderer()
        legend = None
        for ncol in range(len(handles), 0, -1):
            if legend is not None:
                legend.remove()
            legend = fig.legend(handles=handles, ncol=ncol, fontsize=8, frameon=False,
                                loc="upper center", borderaxespad=0, handlelength=1.5,
                                columnspacing=1.2)
            extent = legend.get_window_extent(renderer)
            if extent.width / fig.dpi <= self.width - 2 * _PAD:
                break
        legend_w, legend_h = extent.width / fig.dpi, extent.height / fig.dpi
        # A legend wider than the panels even in one column (a long class name) widens them.
        # Whole pixels: a fraction of one would be cut off the PNG.
        self.width = math.ceil(max(self.width, legend_w + 2 * _PAD) * fig.dpi) / fig.dpi
        self.height = math.ceil((self._legend_top + legend_h + _PAD) * fig.dpi) / fig.dpi
        fig.set_size_inches(self.width, self.height)
        for ax, rect in zip(fig.axes, [*self.panels, self.bar]):
            ax.set_position(rect)
        legend.set_bbox_to_anchor((0.5, 1 - self._legend_top / self.height), transform=fig.transFigure)

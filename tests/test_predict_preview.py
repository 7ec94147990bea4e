"""The preview canvas samples the raster at its pixel centres as windows arrive."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from magseg.config import ClassSpec
from magseg.geometry import Rect
from magseg.io.preview import PreviewCanvas
from magseg.io.raster import NODATA, VALUE_MAX


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 120), w=st.integers(1, 120), side=st.integers(1, 40))
def test_windows_fill_the_canvas_with_nearest_samples(h, w, side):
    rng = np.random.default_rng(h * 1000 + w)
    labels = rng.integers(0, 4, size=(h, w)).astype(np.uint8)
    pixels = rng.integers(1, 255, size=(3, h, w)).astype(np.uint8)
    valid = rng.random((h, w)) > 0.1
    labels[~valid] = NODATA
    canvas = PreviewCanvas((h, w), side)
    step = -(-max(h, w) // side)
    assert len(canvas.rows) <= side and len(canvas.cols) <= side
    for core in (Rect(t, l, min(16, h - t), min(16, w - l))  # the owned regions of crops
                 for t in range(0, h, 16) for l in range(0, w, 16)):
        canvas.add(core, pixels[(slice(None), *core.slices)], labels[core.slices],
                   np.full((core.height, core.width), 51, np.uint8), valid[core.slices])
    rows = np.arange(step // 2, h, step)
    cols = np.arange(step // 2, w, step)
    np.testing.assert_array_equal(canvas.labels, labels[np.ix_(rows, cols)])
    expected = np.where(valid[np.ix_(rows, cols)], pixels[0][np.ix_(rows, cols)], np.nan)
    np.testing.assert_array_equal(canvas.image[0], expected)
    assert np.allclose(canvas.uncertainty[valid[np.ix_(rows, cols)]], 51 / VALUE_MAX)


def test_preview_png_has_three_panels(tmp_path):
    import cv2

    canvas = PreviewCanvas((60, 80), 40)
    labels = np.zeros((60, 80), np.uint8)
    labels[:, 40:] = 1
    canvas.add(Rect(0, 0, 60, 80), np.full((1, 60, 80), 7, np.uint16), labels,
               np.zeros((60, 80), np.uint8), np.ones((60, 80), bool))
    classes = [ClassSpec(0, "left", (255, 0, 0)), ClassSpec(1, "right", (0, 0, 255))]
    rgb = canvas.labels_rgb(classes)
    assert tuple(rgb[0, 0]) == (1, 0, 0) and tuple(rgb[0, -1]) == (0, 0, 1)
    canvas.save(tmp_path / "p.png", classes, title="t")
    image = cv2.imread(str(tmp_path / "p.png"))[..., ::-1]
    assert image.shape[1] > image.shape[0]
    # both class colours are drawn (panel and legend)
    flat = image.reshape(-1, 3)
    assert ((flat == (255, 0, 0)).all(1)).sum() > 100 and ((flat == (0, 0, 255)).all(1)).sum() > 100


# (H, W): square and small, tall and narrow, wide strips, and slivers.
AWKWARD_SHAPES = [(100, 100), (1024, 90), (120, 1024), (90, 1024), (1024, 120), (6, 400), (400, 6)]
LONG_NAMES = [ClassSpec(0, "unknown", (10, 10, 10), in_mean=False), ClassSpec(1, "urban", (0, 250, 250)),
              ClassSpec(2, "agriculture", (250, 250, 0)), ClassSpec(3, "rangeland", (250, 0, 250)),
              ClassSpec(4, "forest", (0, 250, 0)), ClassSpec(5, "water", (0, 0, 250)),
              ClassSpec(6, "barren land and bare rock", (120, 60, 30))]


def _awkward_canvas(h: int, w: int) -> PreviewCanvas:
    """Class 0 everywhere and uncertainty 0.5 everywhere: any other class colour in the PNG is
    a legend swatch, and the ends of the magma scale can only be the colour bar."""
    canvas = PreviewCanvas((h, w))
    canvas.add(Rect(0, 0, h, w), np.full((3, h, w), 90, np.uint8), np.zeros((h, w), np.uint8),
               np.full((h, w), 128, np.uint8), np.ones((h, w), bool))
    return canvas


def _inside(extent, width: int, height: int) -> bool:
    return extent.x0 >= 0 and extent.y0 >= 0 and extent.x1 <= width and extent.y1 <= height


def _has_colour(image: np.ndarray, rgb, tolerance: int = 3, at_least: int = 15) -> bool:
    near = (np.abs(image.astype(int) - np.asarray(rgb)) <= tolerance).all(-1)
    return int(near.sum()) >= at_least


def test_every_text_and_swatch_is_inside_the_png_at_any_shape(tmp_path):
    import cv2
    import matplotlib

    magma = matplotlib.colormaps["magma"]
    for h, w in AWKWARD_SHAPES:
        fig = _awkward_canvas(h, w).figure(LONG_NAMES, title=f"scene_{w}x{h}.tif")
        path = tmp_path / f"{h}x{w}.png"
        fig.savefig(path, format="png")
        image = cv2.imread(str(path))[..., ::-1]
        height, width = image.shape[:2]
        assert (width, height) == tuple(round(v) for v in fig.get_size_inches() * fig.dpi)
        renderer = fig.canvas.get_renderer()
        legend = fig.legends[0]
        texts = [*legend.get_texts(), *(ax.title for ax in fig.axes), *fig.texts]
        assert [t.get_text() for t in legend.get_texts()] == [c.name for c in LONG_NAMES]
        for text in texts:
            assert _inside(text.get_window_extent(renderer), width, height), (h, w, text.get_text())
        assert _inside(legend.get_window_extent(renderer), width, height), (h, w)
        # Every class's swatch is drawn (only class 0 is on the map).
        for c in LONG_NAMES[1:]:
            assert _has_colour(image, c.color), (h, w, c.name)
        # The colour bar: both ends of the scale, which the constant 0.5 panel cannot show.
        for end in (0.02, 0.98):
            assert _has_colour(image, np.round(np.asarray(magma(end)[:3]) * 255)), (h, w, end)
        label = fig.axes[-1]
        assert (label.get_ylabel() or label.get_xlabel()) == "1 - certainty"


def test_panels_fill_the_figure_of_a_strip_and_a_square():
    # A wide strip stacks its panels: side by side, three 1024 x 120 strips left a figure
    # four fifths empty.
    for h, w in [(120, 1024), (100, 100), (300, 700)]:
        fig = _awkward_canvas(h, w).figure(LONG_NAMES)
        renderer = fig.canvas.get_renderer()
        panels = sum(ax.get_window_extent(renderer).width * ax.get_window_extent(renderer).height
                     for ax in fig.axes[:3])
        canvas = np.prod(fig.get_size_inches() * fig.dpi)
        assert panels / canvas >= 0.35, (h, w, panels / canvas)


def test_nodata_gets_a_legend_entry_only_where_there_is_some():
    canvas = _awkward_canvas(50, 50)
    assert "nodata" not in [t.get_text() for t in canvas.figure(LONG_NAMES).legends[0].get_texts()]
    canvas.labels[:5] = NODATA
    assert "nodata" in [t.get_text() for t in canvas.figure(LONG_NAMES).legends[0].get_texts()]

"""The preview canvas samples the raster at its pixel centres as windows arrive."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from magseg.config import ClassSpec
from magseg.io.preview import PreviewCanvas
from magseg.io.raster import NODATA, PixelWindow


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
    for core in (PixelWindow(t, l, min(16, h - t), min(16, w - l))  # the owned regions of crops
                 for t in range(0, h, 16) for l in range(0, w, 16)):
        canvas.add(core, pixels[(slice(None), *core.slices)], labels[core.slices],
                   np.full((core.height, core.width), 51, np.uint8), valid[core.slices])
    rows = np.arange(step // 2, h, step)
    cols = np.arange(step // 2, w, step)
    np.testing.assert_array_equal(canvas.labels, labels[np.ix_(rows, cols)])
    expected = np.where(valid[np.ix_(rows, cols)], pixels[0][np.ix_(rows, cols)], np.nan)
    np.testing.assert_array_equal(canvas.image[0], expected)
    assert np.allclose(canvas.uncertainty[valid[np.ix_(rows, cols)]], 0.2)


def test_preview_png_has_three_panels(tmp_path):
    import cv2

    canvas = PreviewCanvas((60, 80), 40)
    labels = np.zeros((60, 80), np.uint8)
    labels[:, 40:] = 1
    from magseg.io.raster import PixelWindow

    canvas.add(PixelWindow(0, 0, 60, 80), np.full((1, 60, 80), 7, np.uint16), labels,
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

"""The scene-window plan: cores tile the raster, windows are scene-sized and inside it, every
core pixel has its context margin (except at the raster's own edge), cores are whole tiles."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from magseg.io.raster import axis_windows, plan_scene_windows


def _distance_to_inner_edges(window, size):
    """``(h, w)`` distance of each pixel of a read window to its nearest edge that is not the
    raster's edge (inf where every edge is the raster's)."""
    h, w = window.height, window.width
    rows = np.arange(h)[:, None].astype(float)
    cols = np.arange(w)[None, :].astype(float)
    d = np.full((h, w), np.inf)
    if window.row > 0:
        d = np.minimum(d, rows)
    if window.row + h < size[0]:
        d = np.minimum(d, h - 1 - rows)
    if window.col > 0:
        d = np.minimum(d, cols)
    if window.col + w < size[1]:
        d = np.minimum(d, w - 1 - cols)
    return d


@settings(max_examples=150, deadline=None)
@given(
    size=st.tuples(st.integers(1, 400), st.integers(1, 400)),
    scene=st.tuples(st.integers(8, 120), st.integers(8, 120)),
    fraction=st.sampled_from([0, 1 / 16, 1 / 8, 1 / 4, 3 / 8]),
    block=st.sampled_from([16, 32, 512]),
)
def test_cores_tile_the_raster_and_keep_their_margin(size, scene, fraction, block):
    margin = tuple(int(s * fraction) for s in scene)
    plan = plan_scene_windows(size, scene, margin, block=block)
    owned = np.zeros(size, dtype=np.int32)
    for w in plan:
        # scene-sized (clipped to a raster smaller than the scene) and inside the raster
        assert (w.read.height, w.read.width) == (min(scene[0], size[0]), min(scene[1], size[1]))
        assert 0 <= w.read.row and w.read.row + w.read.height <= size[0]
        assert 0 <= w.read.col and w.read.col + w.read.width <= size[1]
        # the core lies inside the window, and its pixels are >= margin from an inner edge
        r, c = w.core_in_read
        assert r.start >= 0 and r.stop <= w.read.height and c.start >= 0 and c.stop <= w.read.width
        dist = _distance_to_inner_edges(w.read, size)[r, c]
        assert dist.min() >= min(margin)
        owned[w.core.slices] += 1
    assert np.all(owned == 1), "cores must cover every pixel exactly once"


@settings(max_examples=100, deadline=None)
@given(length=st.integers(1, 5000), scene=st.integers(64, 2048), fraction=st.sampled_from([1 / 16, 1 / 8, 1 / 4]))
def test_inner_core_borders_fall_on_output_tile_borders(length, scene, fraction):
    # Whole tiles per window: GDAL never has to keep a half-written tile (memory stays flat).
    block = 512
    plan = plan_scene_windows((1, length), (1, scene), (0, int(scene * fraction)), block=block)
    core = scene - 2 * int(scene * fraction)
    for w in plan:
        if core >= block:
            assert w.core.col % block == 0
        end = w.core.col + w.core.width
        if end < length and core >= block:
            assert end % block == 0


def test_deepglobe_scene_plan_by_hand():
    # What predict plans (the default 256 px output tiles) for a 2448 px scene, minimum margin 306 (1/8): core 1836 -> 1792 (7 tiles of 256), margin
    # 328. A 16384 px axis: cores start at 0, 1792, ..., 14336 (9 of them); the 10th would
    # be 16128..16384, 256 px <= the margin, so it joins the 9th (14336..16384).
    plan = plan_scene_windows((16384, 5000), (2448, 2448), (306, 306))
    rows = sorted({(w.read.row, w.core.row, w.core.height) for w in plan})
    assert [r[1] for r in rows] == [1792 * i for i in range(9)]
    assert rows[0] == (0, 0, 1792) and rows[1] == (1792 - 328, 1792, 1792)
    assert rows[-1] == (16384 - 2448, 14336, 2048)
    # 5000 px: cores 0, 1792, 3584..5000 (1416 px > margin, kept); last window flush right
    cols = sorted({(w.read.col, w.core.col, w.core.width) for w in plan})
    assert cols == [(0, 0, 1792), (1792 - 328, 1792, 1792), (5000 - 2448, 3584, 1416)]
    assert len(plan) == 9 * 3


def test_hand_worked_axis():
    # 170 px, scene 64, margin 8 -> core 48: cores [0,48) [48,96) [96,144) [144,170).
    assert axis_windows(170, 64, 48, 8) == [
        (0, 64, 0, 48), (40, 64, 48, 96), (88, 64, 96, 144), (106, 64, 144, 170)
    ]
    # A last core no longer than the margin is merged into the one before it.
    assert axis_windows(100, 64, 48, 8) == [(0, 64, 0, 48), (36, 64, 48, 100)]
    assert axis_windows(100, 64, 48, 2) == [(0, 64, 0, 48), (36, 64, 48, 96), (36, 64, 96, 100)]
    # A raster no longer than the scene is one window.
    assert axis_windows(50, 64, 48, 8) == [(0, 50, 0, 50)]


def test_scene_windows_rounds_cores_to_tiles_and_widens_the_margin():
    plan = plan_scene_windows((4096, 4096), (2448, 2448), (306, 306), block=512)
    # 2448 - 2 x 306 = 1836 -> 1536 (3 tiles of 512); the margin grows to 456.
    assert sorted({w.core.row for w in plan}) == [0, 1536, 3072]
    middle = [w for w in plan if w.core.row == 1536 and w.core.col == 1536][0]
    assert (middle.read.row, middle.read.col) == (1536 - 456, 1536 - 456)


def test_margin_that_leaves_no_core_is_refused():
    with pytest.raises(ValueError, match="no core"):
        plan_scene_windows((100, 100), (64, 64), (32, 32))


def test_the_plan_of_a_huge_raster_is_made_on_demand():
    """A 200000 x 200000 raster: the plan holds its two axes (112 windows each), not its
    12544 windows, and makes each one when it is asked for."""
    import tracemalloc

    tracemalloc.start()
    try:
        plan = plan_scene_windows((200_000, 200_000), (2448, 2448), (306, 306))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_axis = len(axis_windows(200_000, 2448, 1792, 328))
    assert per_axis == 112 and len(plan) == per_axis**2
    assert peak < 100_000, f"{peak} bytes for the plan"       # a list of windows: ~5 MB
    first, last = plan[0], plan[-1]
    assert (first.core.row, first.core.col) == (0, 0) and first.read.height == 2448
    assert (last.core.row + last.core.height, last.core.col + last.core.width) == (200_000, 200_000)
    assert plan[per_axis] == next(w for i, w in enumerate(plan) if i == per_axis)  # 2nd row, 1st col


def test_indexing_and_iteration_give_the_same_windows():
    plan = plan_scene_windows((300, 500), (64, 64), (8, 8), block=16)
    windows = list(plan)
    assert len(windows) == len(plan) > 20
    assert [plan[i] for i in range(len(plan))] == windows
    assert plan[-1] == windows[-1] and plan[2:5] == windows[2:5]
    with pytest.raises(IndexError):
        plan[len(plan)]

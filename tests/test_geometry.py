"""``Rect``, magseg's one rectangle: its slices, intersection and moves against numpy's own
indexing of masks, over many generated sizes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from magseg.geometry import Rect

ARRAY = (23, 31)  # every rectangle below lies in or around an array of this size
coords = st.integers(-8, 40)
extents = st.integers(0, 30)
rects = st.builds(Rect, coords, coords, extents, extents)
inside = st.builds(Rect, st.integers(0, ARRAY[0]), st.integers(0, ARRAY[1]), extents, extents).filter(
    lambda r: r.bottom <= ARRAY[0] and r.right <= ARRAY[1])


def mask(rect: Rect, shape=ARRAY, origin=(0, 0)) -> np.ndarray:
    """The pixels of ``rect`` on an array of ``shape`` whose top-left pixel is ``origin``,
    pixel by pixel (no slicing)."""
    rows = np.arange(shape[0])[:, None] + origin[0]
    cols = np.arange(shape[1])[None, :] + origin[1]
    return (rows >= rect.top) & (rows < rect.top + rect.height) & (cols >= rect.left) & (cols < rect.left + rect.width)


# A canvas that holds every generated rectangle, moved or grown, with its origin at (-20, -20).
CANVAS, ORIGIN = (110, 110), (-20, -20)


@settings(max_examples=300, deadline=None)
@given(rect=inside)
def test_slices_cut_what_the_rectangle_covers(rect):
    image = np.arange(ARRAY[0] * ARRAY[1]).reshape(ARRAY)
    cut = image[rect.slices]
    assert cut.shape == rect.size == (rect.height, rect.width)
    assert np.array_equal(np.sort(cut.ravel()), np.sort(image[mask(rect)]))
    if not rect.empty:
        assert cut[0, 0] == image[rect.top, rect.left] and cut[-1, -1] == image[rect.bottom - 1, rect.right - 1]


@settings(max_examples=300, deadline=None)
@given(a=rects, b=rects)
def test_intersection_is_the_pixels_in_both(a, b):
    both = a.intersection(b)
    expected = mask(a, CANVAS, ORIGIN) & mask(b, CANVAS, ORIGIN)
    assert both.height >= 0 and both.width >= 0
    assert np.array_equal(mask(both, CANVAS, ORIGIN), expected)
    assert both.empty == (not expected.any()) == (not a.meets(b))
    assert both == b.intersection(a)
    if not both.empty:
        assert a.contains(both) and b.contains(both)


@settings(max_examples=300, deadline=None)
@given(a=rects, b=rects)
def test_contains_means_every_pixel_lies_inside(a, b):
    pixels_a, pixels_b = mask(a, CANVAS, ORIGIN), mask(b, CANVAS, ORIGIN)
    if not b.empty:
        assert a.contains(b) == bool(np.all(pixels_a[pixels_b]))


@settings(max_examples=300, deadline=None)
@given(outer=inside, data=st.data())
def test_within_cuts_a_part_out_of_an_array_holding_the_outer_rectangle(outer, data):
    top = data.draw(st.integers(outer.top, outer.bottom))
    left = data.draw(st.integers(outer.left, outer.right))
    part = Rect(top, left, data.draw(st.integers(0, outer.bottom - top)),
                data.draw(st.integers(0, outer.right - left)))
    image = np.arange(ARRAY[0] * ARRAY[1]).reshape(ARRAY)
    assert outer.contains(part)
    assert np.array_equal(image[outer.slices][part.within(outer)], image[part.slices])


@settings(max_examples=200, deadline=None)
@given(rect=rects, dy=st.integers(-5, 5), dx=st.integers(-5, 5), margin=st.integers(0, 4))
def test_shifted_and_grown_move_the_pixels(rect, dy, dx, margin):
    moved = np.roll(mask(rect, CANVAS, ORIGIN), (dy, dx), axis=(0, 1))
    assert np.array_equal(mask(rect.shifted(dy, dx), CANVAS, ORIGIN), moved)
    grown = rect.grown(margin)
    assert (grown.bottom - grown.top, grown.right - grown.left) == (rect.height + 2 * margin, rect.width + 2 * margin)
    assert grown.top == rect.top - margin and grown.left == rect.left - margin
    assert grown.contains(rect) or rect.empty


def test_by_hand():
    r = Rect(2, 3, 4, 5)
    assert (r.bottom, r.right, r.size, r.empty) == (6, 8, (4, 5), False)
    assert r.slices == (slice(2, 6), slice(3, 8))
    assert Rect.from_slices(slice(2, 6), slice(3, 8)) == r and Rect.of_size((7, 9)) == Rect(0, 0, 7, 9)
    assert r.intersection(Rect(4, 0, 10, 4)) == Rect(4, 3, 2, 1)
    assert r.intersection(Rect(6, 3, 1, 1)).empty and not r.meets(Rect(6, 3, 1, 1))  # touching edges only
    assert r.within(Rect(1, 1, 10, 10)) == (slice(1, 5), slice(2, 7))
    assert r.grown(1) == Rect(1, 2, 6, 7) and r.shifted(-2, 1) == Rect(0, 4, 4, 5)
    with pytest.raises(AttributeError):  # frozen and slotted: no stray attribute, no change
        r.top = 0  # type: ignore[misc]

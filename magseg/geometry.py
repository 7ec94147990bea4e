"""``Rect``: magseg's one rectangle of pixels, for crops, windows of rasters and stage maps.

Coordinates are ``(row, col)`` of an array ``(..., H, W)``, rectangles half-open. A rectangle
may reach outside the array it refers to (a crop window of an image smaller than the crop,
a context window at a border); whoever reads it clips or pads. rasterio's ``Window``
(``col, row, width, height``) appears only where magseg.io.raster calls GDAL.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Rect:
    """The rectangle of ``height`` x ``width`` pixels whose top-left pixel is ``(top, left)``."""

    top: int
    left: int
    height: int
    width: int

    @classmethod
    def of_size(cls, size: tuple[int, int]) -> Rect:
        """The whole of an array of ``size`` ``(H, W)``."""
        return cls(0, 0, size[0], size[1])

    @classmethod
    def from_slices(cls, rows: slice, cols: slice) -> Rect:
        """The rectangle ``array[rows, cols]`` cuts (``start`` and ``stop`` given, step 1)."""
        return cls(rows.start, cols.start, rows.stop - rows.start, cols.stop - cols.start)

    @property
    def bottom(self) -> int:
        """One past the last row."""
        return self.top + self.height

    @property
    def right(self) -> int:
        """One past the last column."""
        return self.left + self.width

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def empty(self) -> bool:
        return self.height <= 0 or self.width <= 0

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(rows, cols)`` that cut this rectangle out of an array of the coordinates it is in
        (``array[..., *rect.slices]``; it must not reach above or left of the array)."""
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)

    def within(self, outer: Rect) -> tuple[slice, slice]:
        """``(rows, cols)`` that cut this rectangle out of an array holding ``outer`` (which
        contains it): its slices in ``outer``'s own coordinates."""
        top, left = self.top - outer.top, self.left - outer.left
        return slice(top, top + self.height), slice(left, left + self.width)

    def shifted(self, dy: int, dx: int) -> Rect:
        """The same rectangle moved by ``dy`` rows and ``dx`` columns."""
        return Rect(self.top + dy, self.left + dx, self.height, self.width)

    def grown(self, margin: int) -> Rect:
        """``margin`` more pixels on every side."""
        return Rect(self.top - margin, self.left - margin,
                    self.height + 2 * margin, self.width + 2 * margin)

    def intersection(self, other: Rect) -> Rect:
        """The pixels in both; ``empty`` (height or width 0) where they do not meet."""
        top, left = max(self.top, other.top), max(self.left, other.left)
        return Rect(top, left, max(0, min(self.bottom, other.bottom) - top),
                    max(0, min(self.right, other.right) - left))

    def meets(self, other: Rect) -> bool:
        """Whether some pixel lies in both."""
        return not self.intersection(other).empty

    def contains(self, other: Rect) -> bool:
        """Whether every pixel of ``other`` lies in this rectangle."""
        return (self.top <= other.top and self.left <= other.left
                and other.bottom <= self.bottom and other.right <= self.right)

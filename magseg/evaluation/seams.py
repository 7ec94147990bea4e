"""The seam score: how much more often a map changes across a stage's crop borders than
across any other line of pixels.

For a map ``(H, W)`` the change rate of a line is the share of the pixel pairs across it
that differ: the line between columns ``x - 1`` and ``x`` has ``H`` pairs, the line between
rows ``y - 1`` and ``y`` has ``W``. For a class map a pair changes when its labels differ; for
a continuous map (uncertainty) the change is the pair's absolute difference. Then

    seam score = change rate over the crop-border lines / change rate over the control lines

The control lines are every other line at the same phase as a border line with respect to
the map's upsampling period ``p`` (map pixels per pixel of the pyramid's first stage, e.g.
512 / 128 = 4): a line ``l`` is a control when ``l mod p`` is the residue of a border line of
its axis and ``l`` is not a border. A map made by enlarging a coarser one changes more often
at some phases of its period than at others, and crop borders all sit at one phase; against
all lines, or against their median (lower than their mean: a few lines carry most changes),
a map with no crops at all scores 3-5 at the borders of a grid it never had. Against lines
of the same phase, such a map scores about 1.

1.0 means the crop grid is invisible; a grid painted into the map gives far more (a map
whose every crop was predicted from another scene scores the ratio of its border changes to
its other lines). Crop borders are the lines between the owned regions of a stage's crops
(``magseg.engine.pyramid.crop_boxes``), mapped to the map's size: a map at the image size
shows each stage's grid at ``border * H / h``.

Rates are summed changes over summed pixel pairs. When no control line changes, one change
is assumed (a map that never changes scores 1.0; one that changes only at the borders scores
high, not infinitely). Pairs where either pixel is ``ignore`` (nodata) do not count.

``SeamTally`` sums over many maps (a benchmark split): border and control changes and pairs
are summed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from magseg.engine.pyramid import Size, crop_boxes


def crop_border_lines(stage_size: Size, crop: Size, map_size: Size | None = None
                      ) -> tuple[list[int], list[int]]:
    """The crop borders of a stage, as line indices of a map of ``map_size`` (default the
    stage's own size): ``(rows, cols)``, where row ``y`` is the line between map rows
    ``y - 1`` and ``y`` (and likewise for columns). Empty for a stage of one crop."""
    h, w = stage_size
    mh, mw = map_size if map_size is not None else stage_size
    boxes = crop_boxes(tuple(stage_size), tuple(crop))
    rows = sorted({b.owned.top for b in boxes} - {0})
    cols = sorted({b.owned.left for b in boxes} - {0})
    # A border at stage pixel r lies at r * mh / h in the map; round to the nearest line.
    rows = sorted({min(max(round(r * mh / h), 1), mh - 1) for r in rows}) if mh > 1 else []
    cols = sorted({min(max(round(c * mw / w), 1), mw - 1) for c in cols}) if mw > 1 else []
    return rows, cols


def pyramid_border_lines(scales: Sequence[Size], crop: Size, map_size: Size,
                         scene: Size | None = None) -> list[tuple[list[int], list[int]]]:
    """``crop_border_lines`` of every stage of a pyramid on a map of ``map_size`` (the image
    size: stage sizes as ``magseg.engine.pyramid.stage_sizes`` gives them for it)."""
    from magseg.engine.pyramid import stage_sizes

    return [crop_border_lines(size, crop, map_size)
            for size in stage_sizes(tuple(tuple(s) for s in scales), tuple(map_size), scene)]


def line_period(scales: Sequence[Size], map_size: Size, scene: Size | None = None) -> tuple[int, int]:
    """The upsampling period ``(rows, cols)`` of a map of ``map_size`` made by the pyramid:
    map pixels per pixel of its first (smallest) stage, rounded (1 where the map is no
    larger)."""
    from magseg.engine.pyramid import stage_sizes

    first = stage_sizes(tuple(tuple(s) for s in scales), tuple(map_size), scene)[0]
    return (max(1, round(map_size[0] / max(1, first[0]))), max(1, round(map_size[1] / max(1, first[1]))))


@dataclass
class LineChanges:
    """One map's changes per line: ``cols[x]`` / ``col_pairs[x]`` across the line before
    column ``x`` (index 0 unused), ``rows[y]`` / ``row_pairs[y]`` likewise for rows."""

    rows: np.ndarray  # (H,) float64 summed changes
    row_pairs: np.ndarray  # (H,) int64
    cols: np.ndarray  # (W,) float64
    col_pairs: np.ndarray  # (W,) int64


def line_changes(values: np.ndarray, continuous: bool = False, ignore: int | None = None,
                 invalid: np.ndarray | None = None) -> LineChanges:
    """The changes across every line of ``values`` ``(H, W)``: label changes (``!=``) of a
    class map, or absolute differences of a ``continuous`` one; pairs touching ``ignore``
    (or a pixel where ``invalid``, ``(H, W)`` bool) are left out."""
    a = np.asarray(values)
    if a.ndim != 2:
        raise ValueError(f"a map must be (H, W), got shape {a.shape}")
    strips = StripChanges(a.shape[1], continuous, ignore)
    strips.add(a, invalid)
    return strips.changes()


class StripChanges:
    """``line_changes`` of a map read in strips of whole rows, top to bottom (a raster of
    any size): ``add`` each strip, then ``changes()``. The line between two strips is
    counted from the last row kept of the previous one."""

    def __init__(self, width: int, continuous: bool = False, ignore: int | None = None) -> None:
        self.continuous, self.ignore = continuous, ignore
        self.rows: list[float] = [0.0]
        self.row_pairs: list[int] = [0]
        self.cols = np.zeros(width, np.float64)
        self.col_pairs = np.zeros(width, np.int64)
        self._last: tuple[np.ndarray, np.ndarray] | None = None

    def _diff(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if self.continuous:
            return np.abs(a.astype(np.float64) - b.astype(np.float64))
        return (a != b).astype(np.float64)

    def add(self, strip: np.ndarray, invalid: np.ndarray | None = None) -> None:
        """The next rows ``(h, W)`` of the map (``invalid``: ``(h, W)`` bool, left out)."""
        bad = np.zeros(strip.shape, bool) if invalid is None else np.asarray(invalid, bool).copy()
        if self.ignore is not None:
            bad |= strip == self.ignore
        if self._last is not None:
            strip = np.concatenate([self._last[0], strip])
            bad = np.concatenate([self._last[1], bad])
            first = 1
        else:
            first = 0
        okv, okh = ~(bad[1:] | bad[:-1]), ~(bad[:, 1:] | bad[:, :-1])
        dv = self._diff(strip[1:], strip[:-1]) * okv
        dh = self._diff(strip[first:, 1:], strip[first:, :-1]) * okh[first:]
        self.rows += dv.sum(axis=1).tolist()
        self.row_pairs += okv.sum(axis=1).tolist()
        self.cols[1:] += dh.sum(axis=0)
        self.col_pairs[1:] += okh[first:].sum(axis=0)
        self._last = (strip[-1:], bad[-1:])

    def changes(self) -> LineChanges:
        return LineChanges(np.asarray(self.rows, np.float64), np.asarray(self.row_pairs, np.int64),
                           self.cols.copy(), self.col_pairs.copy())


def control_lines(borders: Sequence[int], n: int, period: int) -> list[int]:
    """The lines ``1..n-1`` that are not ``borders`` but share a border's residue modulo
    ``period`` (empty without borders)."""
    residues = {b % period for b in borders}
    taken = set(borders)
    return [line for line in range(1, n) if line % period in residues and line not in taken]


@dataclass
class SeamTally:
    """A seam score summed over maps: ``add`` each map with its borders, then ``score``."""

    border_changes: float = 0.0
    border_pairs: int = 0
    control_changes: float = 0.0
    control_pairs: int = 0

    def add(self, changes: LineChanges, rows: Sequence[int], cols: Sequence[int],
            period: tuple[int, int] = (1, 1)) -> None:
        """One map's ``changes`` with its border lines; ``period``: ``line_period``."""
        rows, cols = list(rows), list(cols)
        self.border_changes += float(changes.rows[rows].sum() + changes.cols[cols].sum())
        self.border_pairs += int(changes.row_pairs[rows].sum() + changes.col_pairs[cols].sum())
        ctrl_rows = control_lines(rows, len(changes.rows), period[0])
        ctrl_cols = control_lines(cols, len(changes.cols), period[1])
        self.control_changes += float(changes.rows[ctrl_rows].sum() + changes.cols[ctrl_cols].sum())
        self.control_pairs += int(changes.row_pairs[ctrl_rows].sum() + changes.col_pairs[ctrl_cols].sum())

    def merge(self, other: "SeamTally") -> None:
        self.border_changes += other.border_changes
        self.border_pairs += other.border_pairs
        self.control_changes += other.control_changes
        self.control_pairs += other.control_pairs

    @property
    def border_rate(self) -> float | None:
        return self.border_changes / self.border_pairs if self.border_pairs else None

    @property
    def control_rate(self) -> float:
        """The change rate of the control lines (one change assumed when none changed)."""
        if not self.control_pairs:
            return 0.0
        return max(self.control_changes, 1.0) / self.control_pairs

    def score(self) -> float | None:
        """The seam score, or None when there is no border (a stage of one crop)."""
        border = self.border_rate
        if border is None:
            return None
        if border == 0:
            return 1.0 if self.control_changes == 0 else 0.0
        control = self.control_rate
        return border / control if control > 0 else None


def seam_score(values: np.ndarray, rows: Sequence[int], cols: Sequence[int], *,
               period: tuple[int, int] = (1, 1), continuous: bool = False,
               ignore: int | None = None) -> float | None:
    """The seam score of one map ``(H, W)`` across the border lines ``rows`` and ``cols``
    (``crop_border_lines``), against the control lines of ``period``; None when there are
    no borders."""
    tally = SeamTally()
    tally.add(line_changes(values, continuous, ignore), rows, cols, period)
    return tally.score()


def stage_seam_scores(values: np.ndarray, scales: Sequence[Size], crop: Size, scene: Size | None = None,
                      *, continuous: bool = False, ignore: int | None = None) -> list[float | None]:
    """The seam score of a map at the image size across each stage's crop borders, coarse
    to fine (None for a stage of one crop)."""
    changes = line_changes(values, continuous, ignore)
    period = line_period(scales, tuple(np.shape(values)), scene)
    out = []
    for rows, cols in pyramid_border_lines(scales, crop, tuple(np.shape(values)), scene):
        tally = SeamTally()
        tally.add(changes, rows, cols, period)
        out.append(tally.score())
    return out

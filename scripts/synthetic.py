"""Synthetic land-cover scenes in the DeepGlobe layout, built so that context *and* detail matter.

A scene is made in three layers, each aimed at one weakness of a single-scale method:

1. **Land units** (context). The scene is cut into a few large cells (a warped Voronoi
   diagram; about ``cells`` of them, so a cell is wider than a quarter of the scene, i.e.
   wider than one finest-scale crop of MagNet's pyramid). Most cells are *fields*:
   agriculture or rangeland, painted with **one and the same texture process** (base
   colour, crop-row stripes, mottling: identical distributions for both classes). What
   tells them apart is the cell's *margin*: a band ``rim`` wide along the cell's border,
   a dark hedgerow for agriculture, a reddish scrub verge for rangeland. A crop from a
   field's interior sees no margin and cannot tell the two apart; the downsampled scene
   shows every cell with its margin.
2. **Islands**: smaller blobs of forest, barren land, urban blocks and ponds (no margin)
   inside the cells, for variety.
3. **Thin structures** (detail): rivers (water) and dirt tracks (barren) ``thin`` pixels wide
   (default 2-4), with a contrast comparable to the fields' own mottling. Downsampled 4x
   they are a fraction of a pixel wide and drown in the texture; at full resolution they
   are sharp lines. Rivers are the only water apart from rare ponds.

Rarely, a corner of the scene has no data (black pixels, class 0 'unknown'), as in
DeepGlobe.

Every random choice comes from ``numpy.random.default_rng([seed, index])``, so a scene
depends only on the seed and its index (not on how many scenes are made or in what order),
and the same seed gives byte-identical files.

Sizes are ``(H, W)``; arrays are ``(H, W)`` or ``(H, W, 3)`` while painting and
``(3, H, W)`` at the edges, as elsewhere in magseg.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from magseg.config import ClassSpec
from magseg.data.scenes import encode_colors
from magseg.errors import DataError, OutputExistsError
from magseg.io.atomic import atomic_write

# DeepGlobe land cover: ids and colours (configs/deepglobe.yaml holds the same; a test checks).
DEEPGLOBE_CLASSES: tuple[ClassSpec, ...] = (
    ClassSpec(id=0, name="unknown", color=(0, 0, 0), in_mean=False),
    ClassSpec(id=1, name="urban", color=(0, 255, 255)),
    ClassSpec(id=2, name="agriculture", color=(255, 255, 0)),
    ClassSpec(id=3, name="rangeland", color=(255, 0, 255)),
    ClassSpec(id=4, name="forest", color=(0, 255, 0)),
    ClassSpec(id=5, name="water", color=(0, 0, 255)),
    ClassSpec(id=6, name="barren", color=(255, 255, 255)),
)
# The config override that gives a checkpoint DeepGlobe's classes (the scenes here have them).
DEEPGLOBE_CLASSES_OVERRIDE = {"classes": [asdict(c) for c in DEEPGLOBE_CLASSES]}
UNKNOWN, URBAN, AGRICULTURE, RANGELAND, FOREST, WATER, BARREN = range(7)
FIELDS = (AGRICULTURE, RANGELAND)

SPLITS = ("train", "val", "test")

Size = tuple[int, int]


@dataclass(frozen=True)
class SceneSpec:
    """What a synthetic scene looks like. Lengths in pixels unless named a fraction.

    ``cells``: land units per scene (their size follows the scene size). ``field_share``:
    probability that a cell is a field (agriculture or rangeland, even odds). ``rim``:
    margin width as a fraction of the scene's shorter side. ``islands``, ``rivers``,
    ``tracks``: ranges (inclusive) of how many per scene. ``thin``: width range of rivers and
    tracks in pixels. ``unknown``: probability of a no-data corner.
    """

    size: Size = (2448, 2448)
    cells: int = 4
    field_share: float = 0.8
    rim: float = 0.03
    islands: tuple[int, int] = (1, 4)
    rivers: tuple[int, int] = (2, 4)
    tracks: tuple[int, int] = (1, 3)
    thin: tuple[float, float] = (1.5, 3.0)
    unknown: float = 0.1
    # Small-objects scenes: when set, urban is only small buildings, rectangles with sides in
    # ``small_size`` px covering a fraction of the scene drawn from this range. Each one is
    # told by its own roof and shadow, never by where it stands (see ``_small_buildings``).
    small_objects: tuple[float, float] | None = None
    small_size: tuple[int, int] = (4, 30)

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 16:
            raise ValueError(f"scene size must be (H, W) with both >= 16, got {self.size}")
        if self.cells < 1:
            raise ValueError("cells must be >= 1")
        for name in ("islands", "rivers", "tracks", "thin"):
            lo, hi = getattr(self, name)
            if lo < 0 or hi < lo:
                raise ValueError(f"{name} must be a range (lo, hi) with 0 <= lo <= hi")
        if self.thin[0] < 1:
            raise ValueError("thin structures must be at least 1 px wide")
        if self.small_objects is not None:
            lo, hi = self.small_objects
            if not 0 < lo <= hi < 0.5:
                raise ValueError("small_objects must be a fraction range (lo, hi) with 0 < lo <= hi < 0.5")
            if not 1 <= self.small_size[0] <= self.small_size[1]:
                raise ValueError("small_size must be a range (lo, hi) of sides with 1 <= lo <= hi")


@dataclass
class Layout:
    """The label layers of one scene, before painting.

    ``labels``: ``(H, W)`` uint8 class ids. ``cell``: ``(H, W)`` int32 land-unit index.
    ``rim``: ``(H, W)`` bool, field margin pixels. ``thin``: ``(H, W)`` bool, river and track
    pixels. ``cell_class``: class of each land unit.
    """

    labels: np.ndarray
    cell: np.ndarray
    rim: np.ndarray
    thin: np.ndarray
    cell_class: list[int]
    # Small-objects scenes: each building's (top, left, height, width).
    buildings: list[tuple[int, int, int, int]] | None = None


# --------------------------------------------------------------------------- noise


def smooth_noise(rng: np.random.Generator, size: Size, cell: float) -> np.ndarray:
    """Value noise: ``(H, W)`` float32, about zero mean and unit variance, features ~``cell`` px.

    A grid of Gaussian values one per ``cell`` pixels, bicubically interpolated; the random
    offset keeps grid lines from lining up between layers.
    """
    h, w = size
    cell = max(float(cell), 1.0)
    gh, gw = int(math.ceil(h / cell)) + 4, int(math.ceil(w / cell)) + 4
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    big = cv2.resize(grid, (int(gw * cell), int(gh * cell)), interpolation=cv2.INTER_CUBIC)
    oy, ox = rng.integers(0, int(cell) + 1, size=2)
    out = big[oy : oy + h, ox : ox + w]
    # Bicubic interpolation shrinks the variance; bring it back to about 1.
    return (out / max(float(out.std()), 1e-6)).astype(np.float32)


# --------------------------------------------------------------------------- layout


def _spread_points(rng: np.random.Generator, size: Size, n: int, candidates: int = 12) -> np.ndarray:
    """``(n, 2)`` (y, x) points spread over the scene (Mitchell's best candidate)."""
    h, w = size
    points = [rng.uniform((0, 0), (h, w))]
    for _ in range(n - 1):
        cand = rng.uniform((0, 0), (h, w), size=(candidates, 2))
        d = np.min(np.linalg.norm(cand[:, None] - np.asarray(points)[None], axis=2), axis=1)
        points.append(cand[int(np.argmax(d))])
    return np.asarray(points, dtype=np.float32)


def _cells(rng: np.random.Generator, size: Size, n: int) -> np.ndarray:
    """``(H, W)`` int32 land-unit index: a Voronoi diagram on domain-warped coordinates, so
    borders wander like field boundaries instead of running straight."""
    h, w = size
    side = min(h, w)
    seeds = _spread_points(rng, size, n)
    amp = 0.07 * side
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy += amp * smooth_noise(rng, size, side / 3)
    xx += amp * smooth_noise(rng, size, side / 3)
    best = np.full(size, np.inf, dtype=np.float32)
    index = np.zeros(size, dtype=np.int32)
    for i, (sy, sx) in enumerate(seeds):
        d = (yy - sy) ** 2 + (xx - sx) ** 2
        closer = d < best
        best[closer] = d[closer]
        index[closer] = i
    return index


def _borders(cell: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: pixels with a 4-neighbour in another cell."""
    edge = np.zeros(cell.shape, dtype=bool)
    dy = cell[1:] != cell[:-1]
    dx = cell[:, 1:] != cell[:, :-1]
    edge[1:] |= dy
    edge[:-1] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    return edge


def _blob(rng: np.random.Generator, size: Size, centre: tuple[float, float], radius: float) -> np.ndarray:
    """``(H, W)`` bool: an irregular blob of about ``radius`` around ``centre`` (y, x)."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot(yy - centre[0], xx - centre[1]) / radius
    return (r + 0.35 * smooth_noise(rng, size, radius / 1.5)) < 1.0


def _meander(rng: np.random.Generator, size: Size, wiggle: float) -> np.ndarray:
    """``(N, 2)`` float32 (x, y) vertices of a curve entering at one edge and leaving the scene.

    ``wiggle``: standard deviation of the heading change per step, radians.
    """
    h, w = size
    step = max(min(h, w) / 60, 2.0)
    edge = int(rng.integers(4))
    t = rng.uniform(0.1, 0.9)
    start = [(t * w, 0.0), (t * w, h - 1.0), (0.0, t * h), (w - 1.0, t * h)][edge]
    heading = [math.pi / 2, -math.pi / 2, 0.0, math.pi][edge] + rng.normal(0, 0.4)
    x, y = start
    turn = 0.0
    points = [(x, y)]
    for _ in range(int(4 * (h + w) / step)):
        turn = 0.8 * turn + rng.normal(0, wiggle)
        heading += turn
        x += step * math.cos(heading)
        y += step * math.sin(heading)
        points.append((x, y))
        if not (-step <= x <= w + step and -step <= y <= h + step):
            break
    return np.asarray(points, dtype=np.float32)


def draw_line(mask: np.ndarray, points: np.ndarray, width: float) -> None:
    """Set the pixels of ``mask`` (H, W) bool whose centre lies within ``width / 2`` of the
    polyline ``points`` ``(N, 2)`` (x, y), in place.

    Exact distances to each segment, so the line is ``width`` px wide at any angle and for
    any real width (OpenCV's thick lines come only in odd widths, and thinner on diagonals).
    """
    h, w = mask.shape
    r = width / 2
    for (ax, ay), (bx, by) in zip(points[:-1], points[1:]):
        x0, x1 = int(max(math.floor(min(ax, bx) - r), 0)), int(min(math.ceil(max(ax, bx) + r) + 1, w))
        y0, y1 = int(max(math.floor(min(ay, by) - r), 0)), int(min(math.ceil(max(ay, by) + r) + 1, h))
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dx, dy = bx - ax, by - ay
        t = np.clip(((xx - ax) * dx + (yy - ay) * dy) / max(dx * dx + dy * dy, 1e-9), 0, 1)
        d2 = (xx - ax - t * dx) ** 2 + (yy - ay - t * dy) ** 2
        mask[y0:y1, x0:x1] |= d2 < r * r


def make_layout(rng: np.random.Generator, spec: SceneSpec) -> Layout:
    """The label layers of one scene (see the module docstring)."""
    size = spec.size
    h, w = size
    side = min(h, w)
    cell = _cells(rng, size, spec.cells)
    small = spec.small_objects is not None
    # In small-objects scenes urban is only the small buildings, so its IoU measures them.
    others = (FOREST, BARREN) if small else (URBAN, FOREST, BARREN)
    cell_class = [
        int(rng.choice(FIELDS)) if rng.random() < spec.field_share else int(rng.choice(others))
        for _ in range(spec.cells)
    ]
    # Every scene gets at least one field of each kind when it has room: the two classes
    # must meet the model in the same scenes, or the scene itself would give the answer.
    fields = [i for i, c in enumerate(cell_class) if c in FIELDS]
    if len(fields) >= 2 and len({cell_class[i] for i in fields}) == 1:
        flip = fields[int(rng.integers(len(fields)))]
        cell_class[flip] = RANGELAND if cell_class[flip] == AGRICULTURE else AGRICULTURE
    labels = np.asarray(cell_class, dtype=np.uint8)[cell]

    # Field margins: within `rim` of the cell's border, on the field's side.
    width = max(1.0, spec.rim * side)
    dist = cv2.distanceTransform((~_borders(cell)).astype(np.uint8), cv2.DIST_L2, 5)
    is_field = np.isin(labels, FIELDS)
    rim = is_field & (dist < width)

    # Islands: no margin, so they say nothing about the field they sit in.
    for _ in range(int(rng.integers(spec.islands[0], spec.islands[1] + 1))):
        kind = int(rng.choice([FOREST, FOREST, BARREN, WATER] if small else [FOREST, FOREST, BARREN, URBAN, WATER]))
        radius = rng.uniform(0.04, 0.09) * side
        centre = rng.uniform((radius, radius), (h - radius, w - radius))
        blob = _blob(rng, size, tuple(centre), radius)
        labels[blob] = kind
        rim[blob] = False

    # Thin structures on top of everything.
    thin_mask = np.zeros(size, dtype=bool)
    for kind, count, wiggle in ((WATER, spec.rivers, 0.07), (BARREN, spec.tracks, 0.03)):
        for _ in range(int(rng.integers(count[0], count[1] + 1))):
            line = np.zeros(size, dtype=bool)
            draw_line(line, _meander(rng, size, wiggle), rng.uniform(*spec.thin))
            labels[line] = kind
            rim[line] = False
            thin_mask |= line

    # A no-data corner, now and then.
    if rng.random() < spec.unknown:
        depth = rng.uniform(0.05, 0.15) * side
        yy, xx = np.mgrid[0:h, 0:w]
        corner = int(rng.integers(4))
        ty = yy if corner < 2 else (h - 1 - yy)
        tx = xx if corner % 2 == 0 else (w - 1 - xx)
        nodata = (ty + tx) < depth
        labels[nodata] = UNKNOWN
        rim[nodata] = False
        thin_mask[nodata] = False
    buildings = _small_buildings(rng, spec, labels, thin_mask) if small else None
    return Layout(labels=labels, cell=cell, rim=rim, thin=thin_mask, cell_class=cell_class,
                  buildings=buildings)


def _small_buildings(rng: np.random.Generator, spec: SceneSpec, labels: np.ndarray,
                     thin: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Place small urban rectangles ``(top, left, height, width)`` until they cover a
    fraction of the scene drawn from ``spec.small_objects``; labels are set in place.

    Buildings stand anywhere (fields, forest, margins) but off rivers, tracks and no-data,
    and 2 px apart (room for a shadow), so each one stays one object of its drawn size:
    nothing about the place says there is a building, only its own pixels do.
    """
    assert spec.small_objects is not None
    h, w = labels.shape
    lo, hi = spec.small_size
    goal = rng.uniform(*spec.small_objects) * h * w
    blocked = thin | (labels == UNKNOWN)
    taken = np.zeros((h, w), dtype=bool)
    placed: list[tuple[int, int, int, int]] = []
    area = 0
    for _ in range(200 * int(goal / max(lo * lo, 1)) + 100):
        if area >= goal:
            break
        # Most buildings between lo and hi with a lean to small ones, as in real footprints.
        bh, bw = (int(round(lo + (hi - lo) * rng.random() ** 1.5)) for _ in range(2))
        bh, bw = min(bh, h), min(bw, w)
        if area + bh * bw > spec.small_objects[1] * h * w:
            continue
        top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        t0, l0, t1, l1 = max(top - 2, 0), max(left - 2, 0), min(top + bh + 2, h), min(left + bw + 2, w)
        if taken[t0:t1, l0:l1].any() or blocked[top : top + bh, left : left + bw].any():
            continue
        taken[top : top + bh, left : left + bw] = True
        labels[top : top + bh, left : left + bw] = URBAN
        placed.append((top, left, bh, bw))
        area += bh * bw
    return placed


# --------------------------------------------------------------------------- painting

# Mean colours (RGB). Fields share theirs; the margins are what differ.
_FIELD = (150.0, 148.0, 92.0)
_HEDGE = (52.0, 84.0, 40.0)  # agriculture margin
_VERGE = (150.0, 96.0, 76.0)  # rangeland margin
_FOREST = (44.0, 78.0, 44.0)
_BARREN = (184.0, 172.0, 150.0)
_URBAN = (128.0, 128.0, 134.0)
_WATER = (62.0, 88.0, 122.0)
_TRACK = (178.0, 166.0, 140.0)


def paint(rng: np.random.Generator, layout: Layout) -> np.ndarray:
    """The RGB image ``(H, W, 3)`` uint8 of a layout.

    The painting steps draw from ``rng`` in a fixed order (fields, margins and cover, urban,
    small buildings, thin structures, grain): changing it changes every scene of a seed.
    """
    labels = layout.labels
    h, w = labels.shape
    img = np.zeros((h, w, 3), dtype=np.float32)
    _paint_fields(rng, img, layout)
    _paint_cover(rng, img, layout)
    _paint_urban(rng, img, labels == URBAN)
    if layout.buildings is not None:
        _paint_buildings(rng, img, labels, layout.buildings)
    _paint_thin(rng, img, layout)
    return _optics(rng, img, labels)


def _paint_fields(rng: np.random.Generator, img: np.ndarray, layout: Layout) -> None:
    """Paint every cell of ``img`` ``(H, W, 3)`` float32 as a field, in place: per cell a
    base colour, crop rows (direction, spacing) and mottling, all drawn from the same
    distributions for agriculture and rangeland. Non-field cells are painted over later."""
    cell = layout.cell
    size = cell.shape
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    mottle = 14 * smooth_noise(rng, size, 24) + 7 * smooth_noise(rng, size, 6)
    for i in range(len(layout.cell_class)):
        where = cell == i
        base = np.asarray(_FIELD, np.float32) + rng.normal(0, 10, 3).astype(np.float32)
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(6, 14)
        phase = rng.uniform(0, 2 * math.pi)
        rows = 9 * np.sin(2 * math.pi * (xx[where] * math.cos(angle) + yy[where] * math.sin(angle)) / period + phase)
        img[where] = base + (rows + mottle[where])[:, None]


def _paint_layer(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, color,
                 fine_cell: float, fine_amp: float, coarse_amp: float) -> None:
    """Paint the ``(H, W)`` bool ``mask`` of ``img`` ``(H, W, 3)`` float32 in place: ``color``
    (RGB) jittered per layer, plus fine (``fine_cell`` px) and coarse (20 px) texture.

    An empty mask draws nothing from ``rng``.
    """
    if not mask.any():
        return
    size = mask.shape
    tex = fine_amp * smooth_noise(rng, size, fine_cell) + coarse_amp * smooth_noise(rng, size, 20)
    jitter = rng.normal(0, 6, 3).astype(np.float32)
    img[mask] = np.asarray(color, np.float32) + jitter + tex[mask][:, None]


def _paint_cover(rng: np.random.Generator, img: np.ndarray, layout: Layout) -> None:
    """Paint the field margins (hedgerow for agriculture, verge for rangeland), forest and
    barren land over the fields of ``img`` ``(H, W, 3)`` float32, in place."""
    labels, cell, rim = layout.labels, layout.cell, layout.rim
    agri_rim = rim & (np.asarray(layout.cell_class)[cell] == AGRICULTURE)
    range_rim = rim & ~agri_rim
    _paint_layer(rng, img, agri_rim, _HEDGE, 3, 22, 8)
    _paint_layer(rng, img, range_rim, _VERGE, 3, 22, 8)
    _paint_layer(rng, img, labels == FOREST, _FOREST, 4, 24, 10)
    _paint_layer(rng, img, labels == BARREN, _BARREN, 10, 10, 12)


def _paint_urban(rng: np.random.Generator, img: np.ndarray, urban: np.ndarray) -> None:
    """Paint the ``(H, W)`` bool ``urban`` pixels of ``img`` ``(H, W, 3)`` float32 in place:
    a grey layer with buildings on it, a jittered grid of rectangles in a few shades."""
    if not urban.any():
        return
    _paint_layer(rng, img, urban, _URBAN, 5, 8, 6)
    h, w = urban.shape
    blocks = np.zeros((h, w), dtype=np.float32)
    step = 14
    for by in range(0, h, step):
        for bx in range(0, w, step):
            if rng.random() < 0.7:
                bh, bw = rng.integers(5, step - 2, size=2)
                blocks[by : by + bh, bx : bx + bw] = rng.normal(0, 45)
    img[urban] += blocks[urban][:, None]


def _paint_thin(rng: np.random.Generator, img: np.ndarray, layout: Layout) -> None:
    """Paint water and tracks over ``img`` ``(H, W, 3)`` float32, in place.

    Distinct colours (water must not pass for urban grey), but 1.5-3 px wide: at a quarter
    of the resolution a line is a fraction of a pixel, blended with the fields around it,
    and the coarse prediction upsampled cannot follow it.
    """
    labels = layout.labels
    size = labels.shape
    water = labels == WATER
    if water.any():
        img[water] = np.asarray(_WATER, np.float32) + 6 * smooth_noise(rng, size, 8)[water][:, None]
    track = layout.thin & (labels == BARREN)
    if track.any():
        img[track] = np.asarray(_TRACK, np.float32) + 6 * smooth_noise(rng, size, 8)[track][:, None]


def _optics(rng: np.random.Generator, img: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The painted ``img`` ``(H, W, 3)`` float32 as the sensor sees it: a slight blur, then
    grain; no-data pixels stay black. Returns ``(H, W, 3)`` uint8."""
    img[labels == UNKNOWN] = 0
    # Zeroed before the blur, so pixels next to no-data blend towards black, and again after
    # it, since the blur and the grain reach into no-data.
    img = cv2.GaussianBlur(img, (0, 0), 0.6)
    img += rng.normal(0, 3, img.shape).astype(np.float32)
    img[labels == UNKNOWN] = 0
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# Roof colours of small buildings (RGB): tile, concrete, slate.
_ROOFS = ((168.0, 84.0, 66.0), (196.0, 194.0, 188.0), (92.0, 98.0, 112.0))


def _paint_buildings(rng: np.random.Generator, img: np.ndarray, labels: np.ndarray,
                     buildings: list[tuple[int, int, int, int]]) -> None:
    """Each building: a flat roof of one of ``_ROOFS`` (jittered) with a lighter ridge, and
    a 1-2 px shadow outside its south-east edges (still background). The roof and its
    outline tell it apart within a few pixels; downsampled 4x, a 4-10 px building is one or
    two pixels blended with what is around it."""
    h, w = labels.shape
    for top, left, bh, bw in buildings:
        roof = np.asarray(_ROOFS[int(rng.integers(len(_ROOFS)))], np.float32) + rng.normal(0, 8, 3).astype(np.float32)
        img[top : top + bh, left : left + bw] = roof + rng.normal(0, 4, (bh, bw, 1)).astype(np.float32)
        if min(bh, bw) >= 6:  # a ridge line along the longer side
            if bw >= bh:
                img[top + bh // 2, left : left + bw] = roof + 18
            else:
                img[top : top + bh, left + bw // 2] = roof + 18
        shade = int(rng.integers(1, 3))
        below = slice(top + bh, min(top + bh + shade, h)), slice(left + 1, min(left + bw + shade, w))
        right = slice(top + 1, min(top + bh + shade, h)), slice(left + bw, min(left + bw + shade, w))
        for region in (below, right):
            keep = labels[region] != URBAN
            img[region][keep] *= 0.55


def make_scene(seed: int, index: int, spec: SceneSpec = SceneSpec()) -> tuple[np.ndarray, np.ndarray]:
    """Scene ``index`` of the dataset made with ``seed``.

    Returns:
        ``(image (3, H, W) uint8 RGB, labels (H, W) uint8 DeepGlobe class ids)``.
    """
    rng = np.random.default_rng([int(seed), int(index)])
    layout = make_layout(rng, spec)
    image = paint(rng, layout)
    return np.ascontiguousarray(image.transpose(2, 0, 1)), layout.labels


# --------------------------------------------------------------------------- files


def scene_id(index: int) -> str:
    """The id of scene ``index`` (numeric, like DeepGlobe's)."""
    return f"{index:06d}"


def split_ids(counts: Mapping[str, int]) -> dict[str, list[str]]:
    """Ids per split: scenes are numbered across splits in the order train, val, test."""
    unknown = set(counts) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; use {', '.join(SPLITS)}")
    ids: dict[str, list[str]] = {}
    start = 0
    for split in SPLITS:
        n = int(counts.get(split, 0))
        if n < 0:
            raise ValueError(f"{split}: a count of scenes must be >= 0, got {n}")
        ids[split] = [scene_id(i) for i in range(start, start + n)]
        start += n
    return ids


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def _encode(ext: str, rgb: np.ndarray, params: list[int]) -> bytes:
    """``(3, H, W)`` RGB -> encoded file bytes (OpenCV wants BGR, channels last)."""
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(rgb.transpose(1, 2, 0)[:, :, ::-1]), params)
    if not ok:  # pragma: no cover - OpenCV fails only on impossible inputs
        raise DataError(f"cannot encode a {ext} image of shape {rgb.shape}")
    return buf.tobytes()


def scene_files(root: Path, sid: str) -> tuple[Path, Path]:
    """``(image, mask)`` paths of one scene in the DeepGlobe layout."""
    return root / f"{sid}_sat.jpg", root / f"{sid}_mask.png"


def write_dataset(
    root: str | Path,
    counts: Mapping[str, int],
    spec: SceneSpec = SceneSpec(),
    seed: int = 0,
    *,
    jpeg_quality: int = 95,
    overwrite: bool = False,
    on_scene=None,
) -> dict[str, list[str]]:
    """Write a synthetic dataset and its split files; returns the ids per split.

    The DeepGlobe layout: ``<root>/<id>_sat.jpg`` (RGB JPEG), ``<root>/<id>_mask.png`` (RGB
    colours) and ``<root>/{train,val,test}.txt`` (ids, one per line).

    Every file is written atomically. Nothing is written when any target exists and
    ``overwrite`` is false (all of them are checked first).

    Raises:
        OutputExistsError: existing files and no ``overwrite`` (the message lists them).
    """
    root = Path(root)
    ids = split_ids(counts)
    targets = [root / f"{split}.txt" for split in SPLITS if ids[split]]
    for split in SPLITS:
        for sid in ids[split]:
            targets.extend(scene_files(root, sid))
    if not overwrite:
        existing = [p for p in targets if p.exists()]
        if existing:
            shown = ", ".join(str(p) for p in existing[:3])
            more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
            raise OutputExistsError(
                f"{len(existing)} output file(s) exist: {shown}{more}; pass --overwrite to replace them"
            )
    root.mkdir(parents=True, exist_ok=True)

    index = 0
    for split in SPLITS:
        for sid in ids[split]:
            image, labels = make_scene(seed, index, spec)
            image_path, mask_path = scene_files(root, sid)
            _write_bytes(image_path, _encode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]))
            colours = encode_colors(labels, DEEPGLOBE_CLASSES)
            _write_bytes(mask_path, _encode(".png", colours, [cv2.IMWRITE_PNG_COMPRESSION, 6]))
            index += 1
            if on_scene is not None:
                on_scene(split, sid)
        if ids[split]:
            _write_bytes(root / f"{split}.txt", ("\n".join(ids[split]) + "\n").encode())
    return ids

"""``--bbox`` and ``--aoi`` as clips of the whole raster's result (magseg.engine.clip): the
engine runs on the whole raster's geometry (its stage sizes, crops and magnifications), only
the crops the window depends on, and the outputs get the window's part of each crop.

    ClipSink     forwards the part of each crop's owned region inside the window to the
                 outputs' sink, in the window's coordinates
    clip_stages  the engine's source (the whole raster, no AOI mask: the engine sees what
                 the whole run sees) and the plan, for ``magseg.run.predict``
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor

from magseg.config import Config
from magseg.engine.clip import ClipPlan, clip_plan
from magseg.engine.pyramid import CropBox
from magseg.io.raster import RasterReader
from magseg.run.streaming import RasterSource


class ClipSink:
    """A sink for crops in the whole raster's coordinates that writes, to ``sink`` (the
    window's outputs), the part of each owned region inside ``window`` ``(top, left, h, w)``,
    shifted to the window's coordinates."""

    def __init__(self, sink, window: tuple[int, int, int, int]) -> None:
        self.sink = sink
        self.window = window

    @property
    def wants_probs(self) -> bool:
        return self.sink.wants_probs

    def write(self, boxes: list[CropBox], labels: Tensor, probs: Tensor | None) -> None:
        top, left, h, w = self.window
        kept, index = [], []
        for i, b in enumerate(boxes):
            y0, y1 = max(b.own_top, top), min(b.own_top + b.own_height, top + h)
            x0, x1 = max(b.own_left, left), min(b.own_left + b.own_width, left + w)
            if y1 > y0 and x1 > x0:
                # The same crop, moved into the window's coordinates, owning just its part.
                kept.append(CropBox(b.top - top, b.left - left, b.height, b.width,
                                    y0 - top, x0 - left, y1 - y0, x1 - x0))
                index.append(i)
        if kept:
            self.sink.write(kept, labels[index], None if probs is None else probs[index])


@contextlib.contextmanager
def clip_stages(reader: RasterReader, config: Config, normalize) -> Iterator[tuple[RasterSource, ClipPlan | None,
                                                                                  tuple[int, int, int, int]]]:
    """For a ``reader`` restricted to an AOI's window: the whole raster as the engine's
    source (same bands), the crops to run, and the window ``(top, left, h, w)`` in the
    whole raster's pixels."""
    with RasterReader(reader.path, reader.bands) as whole:
        window = (*reader.origin, *reader.size)
        plan = clip_plan(config.pyramid, config.refine, whole.size, window, config.engine.adaptive.enabled,
                         config.engine.batch_size)
        yield RasterSource(whole, normalize), plan, window

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
from magseg.geometry import Rect
from magseg.io.raster import RasterReader
from magseg.run.streaming import RasterSource


class ClipSink:
    """A sink for crops in the whole raster's coordinates that writes, to ``sink`` (the
    window's outputs), the part of each owned region inside ``window``, shifted to the
    window's coordinates."""

    def __init__(self, sink, window: Rect) -> None:
        self.sink = sink
        self.window = window

    @property
    def wants_probs(self) -> bool:
        return self.sink.wants_probs

    def write(self, boxes: list[CropBox], labels: Tensor, probs: Tensor | None) -> None:
        dy, dx = -self.window.top, -self.window.left
        kept, index = [], []
        for i, b in enumerate(boxes):
            part = b.owned.intersection(self.window)
            if not part.empty:
                # The same crop, moved into the window's coordinates, owning just its part.
                kept.append(CropBox(b.window.shifted(dy, dx), part.shifted(dy, dx)))
                index.append(i)
        if kept:
            self.sink.write(kept, labels[index], None if probs is None else probs[index])


@contextlib.contextmanager
def clip_stages(reader: RasterReader, config: Config, normalize
                ) -> Iterator[tuple[RasterSource, ClipPlan | None, Rect]]:
    """For a ``reader`` restricted to an AOI's window: the whole raster as the engine's
    source (same bands), the crops to run, and the window in the whole raster's pixels."""
    with RasterReader(reader.path, reader.bands) as whole:
        window = Rect(*reader.origin, *reader.size)
        plan = clip_plan(config.pyramid, config.refine, whole.size, window, config.engine.adaptive.enabled,
                         config.engine.batch_size)
        yield RasterSource(whole, normalize), plan, window

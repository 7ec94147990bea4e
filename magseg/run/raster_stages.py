"""The stage loop over one raster in predict: its scratch space sized and made, the clip of
an area of interest, the CRF pass, a pool's workers, progress in crops, and a full scratch
disk reported as the input's failure (magseg.run.streaming has the parts)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
import torch

from magseg.config import PyramidConfig
from magseg.engine.crf import CrfSink
from magseg.engine.pyramid import crop_boxes
from magseg.engine.clip import ClipPlan
from magseg.engine.stages import Sink, StageRun, run_stages
from magseg.errors import WriteError
from magseg.io.aoi import AreaOfInterest
from magseg.run.clip import ClipSink, clip_stages
from magseg.run.pools import Pool
from magseg.run.result import PredictResult
from magseg.run.streaming import PoolStages, RasterSink, RasterSource, Scratch, scratch_estimate, scratch_space
from magseg.segmenter import Segmenter


def scratch_for(size: tuple[int, int], pyramid: PyramidConfig, classes: int, crf: bool,
                directory: Path, name: str, source: str, pool: bool = False
                ) -> contextlib.AbstractContextManager[Scratch]:
    """The scratch space in ``directory`` for the stage maps of a raster of ``size`` (named
    after the output ``name``; ``crf``: one more map, the CRF's input; ``pool``: the
    blending stages' backbone answers too, which a pool's workers share on disk), refused
    before any output is made when the disk has not the room (``scratch_space``)."""
    needed = scratch_estimate(pyramid.stage_sizes(size), size, classes, final_map=crf,
                              crop=pyramid.crop, margin=pyramid.margin_pixels if pool else (0, 0))
    return scratch_space(directory, name, needed, pyramid.crop, source, pyramid.margin_pixels)


def run_raster_stages(segmenter: Segmenter, source: RasterSource, sink: RasterSink, scratch: Scratch,
                      result: PredictResult, on_progress: Callable[[int, int], None] | None,
                      aoi: AreaOfInterest | None, pool: Pool | None = None) -> None:
    """``run_stages`` over the raster, the stage maps in ``scratch``; with ``aoi``, a clip of
    the whole raster's result (magseg.run.clip); with ``pool``, each stage's crop batches on
    its workers (``PoolStages``, whose tasks take the Segmenter, as here). Counts the crops,
    the scratch bytes and the window into ``result``."""
    config = segmenter.config
    with contextlib.ExitStack() as stack:
        plan = None
        out: Sink = sink
        if aoi is not None:
            source, plan, window = stack.enter_context(clip_stages(source.reader, config, segmenter.normalize))
            out = ClipSink(sink, window)
        _run(segmenter, source, out, scratch, result, on_progress, aoi, pool, plan)


def _run(segmenter: Segmenter, source: RasterSource, sink: Sink, scratch: Scratch, result: PredictResult,
         on_progress: Callable[[int, int], None] | None, aoi: AreaOfInterest | None, pool: Pool | None,
         plan: ClipPlan | None) -> None:
    config = segmenter.config
    sizes = config.pyramid.stage_sizes(source.size)
    total = (sum(len(crop_boxes(size, config.pyramid.crop)) for size in sizes) if plan is None
             else plan.crops)

    def on_crops(n: int) -> None:
        result.crops += n
        if on_progress:
            on_progress(result.crops, total)

    run = StageRun.create(segmenter.stage_backbone, config.pyramid, refiner=segmenter.refiner,
                          refine=config.refine, engine=config.engine, on_crops=on_crops)
    crf = config.refine.crf
    # With the CRF, the final probabilities go to one more map in the scratch space, then
    # through the CRF tile by tile (with its margin) into the outputs: as segment does.
    final = (CrfSink(sink, source, scratch.new_map(len(sizes), source.size), crf, config.data.std,
                     config.engine.device) if crf.enabled else sink)
    execute = None
    if pool is not None:
        # A clip's workers read the whole raster (plan is not None), as the engine here does.
        execute = PoolStages(pool, source.reader.path, source.reader.bands, aoi if plan is None else None,
                             final, on_crops)
    try:
        with torch.inference_mode():
            # A blending stage's backbone answers: on disk for a pool's workers; in memory
            # here, a few rows of crops at a time (run_stages runs them in order).
            run_stages(run, source, scratch.new_map, final, execute=execute, plan=plan,
                       new_store=None if pool is None else scratch.new_store)
            if final is not sink:
                final.finish()
    except OSError as exc:
        if not str(exc.filename or "").startswith(str(scratch.directory)):
            raise
        # Attributed to the output: the outputs' own handler keeps this message.
        raise WriteError(
            f"{result.input}: its stage maps could not be written in {scratch.directory.parent} "
            f"({exc.strerror}); free some space there or pass --scratch-dir on a larger disk; "
            "nothing was written", target=result.output) from None
    result.scratch_bytes = scratch.peak_bytes
    result.windows = 1

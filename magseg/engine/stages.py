"""The progressive engine: MagNet's coarse-to-fine stage loop, written once.

    stage 0:  image at scales[0] (crop by crop) -> backbone -> probabilities Y, crops stitched
    stage s:  Y upsampled to scales[s] and image at scales[s], both crop by crop -> backbone O
              R = softmax(refiner(O, Y_crop))       (R = O without a refiner)
              Q = median_blur(cert(R) * (1 - cert(Y_crop)))
              the K pixels of highest Q a crop owns take R's values (point_sample + scatter,
              a masked select as R is on the crop's own grid; Q itself is never made, see
              magseg.engine.certainty.top_error_pixels)
    end:      Y resized to the image size -> argmax (at the image size, the last stage
              takes the argmax crop by crop unless probabilities are asked for)

Crops of a stage all read the upsampled Y of the previous stage and write only the pixels
they own (magseg.engine.pyramid) into the stage's new map, so the result does not depend on batch
size or crop order. With a context margin (``pyramid.margin``) a stage first runs every crop's
backbone over its grown window into a ``FineStore``, then each crop reads its fine view
blended with its neighbours' over the margins, and the refiner runs over the grown window
too (magseg.engine.blend): the map shows no crop grid. Nothing is made whole: crops read the
image and Y window by window (magseg.engine.resample), Y lives in a stage map (memory or chunks on disk,
magseg.engine.maps), and the final labels go crop by crop to a sink. ``segment`` runs it on an
image in memory; ``magseg.run.predict`` on a raster of any size, with the same ``run_stages``.
Training uses the same helpers (``crop_probs``, ``refine_probs``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from magseg.config import EngineConfig, PyramidConfig, RefineConfig
from magseg.engine.backbone import context_ratios, gives_probabilities, input_multiple, run_backbone
from magseg.engine.blend import FineStore, blends
from magseg.engine.certainty import certainty
from magseg.engine.crf import CrfSink
from magseg.engine.fused import FusedStep, enlarged_crops_and_cells, worth_fusing
from magseg.engine.inputs import backbone_inputs, resized_input
from magseg.engine.maps import MemoryMap
from magseg.engine.precision import precision_context
from magseg.engine.pyramid import (
    CropBox,
    Size,
    context_windows,
    crop_boxes,
    crop_windows,
    cut_crops,
    grown_input,
    grown_windows,
    resize,
    stitch_crops,
)
from magseg.engine.refine_step import (
    crop_uncertainty,
    labels_of,
    refine_crops,
    refine_labels,
    select_crops,
)
from magseg.engine.refiner_network import CellsRefiner, FusedRefiner, ProbsRefiner, TotalRefiner, WeightsRefiner
from magseg.engine.resample import Source, TensorSource, pool_cells, resample_window, resample_windows
from magseg.geometry import Rect

if TYPE_CHECKING:
    from magseg.engine.clip import ClipPlan


@dataclass
class StageResult:
    """What one stage produced, at the stage's own size ``(h, w)``."""

    size: Size
    labels: Tensor  # (h, w) uint8 argmax of the running prediction after this stage
    refined: Tensor | None  # (h, w) bool: pixels that took the refined values (None at stage 0)
    crops_run: int  # crops that went through the backbone
    crops_total: int
    seconds: float


@dataclass
class SegmentationResult:
    """The engine's output for one image of size ``(H, W)``."""

    labels: Tensor  # (H, W) uint8 class ids
    probs: Tensor | None = None  # (C, H, W) float32 final probabilities, when asked for
    stages: list[StageResult] = field(default_factory=list)

    @property
    def certainty(self) -> Tensor:
        """``(H, W)`` final certainty (top-1 minus top-2); needs ``probs``."""
        if self.probs is None:
            raise ValueError("segment(..., return_probs=True) is needed for certainty")
        return certainty(self.probs[None])[0]


def input_probs(backbone: nn.Module, x: Tensor, input_size: Size, size: Size, *,
                contexts: list[Tensor] | None = None, precision: str = "fp32", channels_last: bool = False,
                multiple: int = 1) -> Tensor:
    """Backbone probabilities ``(B, classes, h, w)``, float32, at ``size`` = ``(h, w)`` of
    inputs ``x`` ``(B, C_in, ih', iw')`` made at ``input_size`` (padded past it or not),
    with ``contexts`` for a multi-context backbone made the same way."""
    with precision_context(x.device, precision):
        out = run_backbone(backbone, x, multiple, contexts, channels_last)
    # Back to NCHW: everything after the backbone (softmax, resize, refiner, certainty, top-K)
    # reduces over or gathers along channels, which is slow in the channels-last layout
    # (docs/performance.md#channels-last). And to float32 whatever the backbone's precision:
    # on a CPU, torch's bf16 softmax, bilinear resize and per-pixel reductions are no faster
    # than float32's (docs/performance.md#on-a-cpu-with-native-bf16).
    # One copy does both (``.float().contiguous()`` makes two from a bf16 channels-last map).
    out = out.to(torch.float32, memory_format=torch.contiguous_format).contiguous()
    # Softmax at the input size, then resize: fewer pixels when crops are larger than the
    # input, and bilinear weights sum to 1, so the result is still a distribution. Over an
    # input padded to the backbone's multiple, the softmax takes the padding too (it is per
    # pixel) and the resize reads the input's part, so no copy cuts it out. A backbone that
    # gives probabilities (OpenVINO's graph, which ends in the softmax) has done it already.
    probs = out if gives_probabilities(backbone) else out.softmax(dim=1)
    return resize(probs[..., : input_size[0], : input_size[1]], tuple(size)).contiguous()


def crop_probs(backbone: nn.Module, crops: Tensor, input_size: Size, *, contexts: list[Tensor] | None = None,
               precision: str = "fp32", channels_last: bool = False, multiple: int | None = None,
               compiled: bool = False) -> Tensor:
    """Backbone probabilities ``(B, classes, ch, cw)`` of image crops ``(B, C_in, ch, cw)``
    at the crops' own resolution: each crop resized to ``input_size`` (``resized_input``; the
    compiled shrink with ``compiled``), and ``contexts`` the same way. What training runs on
    its windows at the stage; the engine makes its inputs with ``backbone_inputs``."""
    if multiple is None:
        multiple = input_multiple(backbone)

    def to_input(x: Tensor) -> Tensor:
        return resized_input(x, input_size, multiple, compiled)

    return input_probs(backbone, to_input(crops), input_size, tuple(crops.shape[-2:]),
                       contexts=None if contexts is None else [to_input(c) for c in contexts],
                       precision=precision, channels_last=channels_last, multiple=multiple)


def refine_probs(refiner: nn.Module | None, fine: Tensor, coarse: Tensor) -> Tensor:
    """R: the refiner's probabilities, or ``fine`` itself when there is no refiner.

    Args:
        fine, coarse: ``(B, C, h, w)`` probabilities.
    """
    if refiner is None:
        return fine
    if isinstance(refiner, ProbsRefiner):  # magseg's Refiner: probabilities without a log pass
        return refiner.probs(fine, coarse).float()
    return refiner(fine, coarse).float().softmax(dim=1)


def refine_weights(refiner: nn.Module | None, fine: Tensor, coarse: Tensor) -> tuple[Tensor, Tensor | None]:
    """R as the refine step takes it: ``(weights, total)`` with ``R = weights / total``
    (``total`` ``(B, h, w)``, their sum over the channels) for a refiner with ``weights``
    (magseg's), else ``(refine_probs(...), None)``; ``fine`` itself without a refiner.

    Args:
        fine, coarse: ``(B, C, h, w)`` probabilities.
    """
    if isinstance(refiner, TotalRefiner):  # magseg's: the sum made band by band with them
        weights, total = refiner.weights_and_total(fine, coarse)
        return weights.float(), total.float()
    if isinstance(refiner, WeightsRefiner):
        weights = refiner.weights(fine, coarse).float()
        return weights, weights.sum(dim=1)
    return refine_probs(refiner, fine, coarse), None


def _batches(items: Sequence[CropBox], size: int) -> Iterator[list[CropBox]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


class StageMap(Protocol):
    """A stage's running probabilities (magseg.engine.maps): read by windows, written by
    crops' owned regions, discarded once the next stage has read it."""

    size: Size

    def read(self, rows: slice, cols: slice) -> Tensor: ...
    def write(self, boxes: list[CropBox], crops: Tensor) -> None: ...
    def discard(self) -> None: ...


@runtime_checkable
class Sink(Protocol):
    """Where the final class map goes, crop by crop at the image size.

    ``write(boxes, labels, probs)``: ``labels`` ``(B, ch, cw)`` uint8 and, when
    ``wants_probs``, ``probs`` ``(B, C, ch, cw)`` float32; each box's owned region is its
    part of the result.
    """

    wants_probs: bool

    def write(self, boxes: list[CropBox], labels: Tensor, probs: Tensor | None) -> None: ...


class MemorySink:
    """The final labels ``(H, W)`` uint8 (and probabilities ``(C, H, W)``) in memory."""

    def __init__(self, size: Size, wants_probs: bool, device: torch.device) -> None:
        self.wants_probs = wants_probs
        self.labels = torch.empty((1, *size), dtype=torch.uint8, device=device)
        self.probs = MemoryMap(size) if wants_probs else None

    def write(self, boxes: list[CropBox], labels: Tensor, probs: Tensor | None) -> None:
        stitch_crops(self.labels, labels[:, None], boxes)
        if self.probs is not None:
            self.probs.write(boxes, probs)


class CollectSink:
    """Keeps what a batch would write to a sink, to be written elsewhere (a worker's batch
    sent back to the process that holds the outputs): ``items`` of ``(boxes, labels, probs)``."""

    def __init__(self, wants_probs: bool) -> None:
        self.wants_probs = wants_probs
        self.items: list[tuple[list[CropBox], Tensor, Tensor | None]] = []

    def write(self, boxes: list[CropBox], labels: Tensor, probs: Tensor | None) -> None:
        self.items.append((boxes, labels.cpu(), None if probs is None else probs.cpu()))


@dataclass(frozen=True)
class BatchJob:
    """One batch of crops of one stage, as data: what ``run_job`` does with it can run in
    this process or in a worker that has the same image and stage maps (shared storage).

    ``kind``: ``backbone`` (a blending stage's first pass: backbone answers into ``fine``),
    ``first`` (stage 0), ``refined`` (a later stage's crops that run the backbone, or read
    their blended fine view from ``fine``) or ``kept`` (crops that take Y upsampled). ``y``:
    the previous stage's map; ``out``: this stage's map, or None for the sink.
    """

    kind: str
    size: Size
    boxes: list[CropBox]
    y: "StageMap | None"
    out: "StageMap | None"
    fine: FineStore | None = None

    @property
    def runs_backbone(self) -> bool:
        """Whether the job's crops go through the backbone (what progress counts)."""
        return self.kind == "backbone" or (self.kind in ("first", "refined") and self.fine is None)


def run_job(run: "StageRun", image: Source, job: BatchJob, sink: Sink,
            picked_map: Tensor | None = None) -> None:
    """Do one ``BatchJob``: its crops of ``image`` into ``job.out`` or ``sink``."""
    out = sink if job.out is None else job.out
    if job.kind == "backbone":
        run.backbone_batch(image, job.size, job.boxes, job.fine)
    elif job.kind == "first":
        run.first_stage(image, job.size, job.boxes, out, job.fine)
    elif job.kind == "refined":
        run.refined_batch(image, job.y, job.size, job.boxes, out, picked_map, job.fine)
    else:
        run.kept_batch(job.y, job.size, job.boxes, out)
    if job.fine is not None and job.kind != "backbone":
        job.fine.release(job.boxes)


@dataclass(frozen=True)
class StageRun:
    """One run of the stage loop: the models and settings every crop batch needs, worked
    out once (the backbone's input multiple and context ratios included)."""

    backbone: nn.Module
    refiner: nn.Module | None
    pyramid: PyramidConfig
    refine: RefineConfig
    engine: EngineConfig
    multiple: int
    ratios: tuple[float, ...]
    on_crops: Callable[[int], None] | None = None

    @classmethod
    def create(cls, backbone: nn.Module, pyramid: PyramidConfig, *, refiner: nn.Module | None = None,
               refine: RefineConfig = RefineConfig(), engine: EngineConfig = EngineConfig(),
               on_crops: Callable[[int], None] | None = None) -> "StageRun":
        return cls(backbone, refiner, pyramid, refine, engine, input_multiple(backbone),
                   context_ratios(backbone), on_crops)

    def window_probs(self, image: Source, size: Size, boxes: list[CropBox]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Backbone probabilities ``(B, classes, eh, ew)`` of crops of ``image`` at ``size``
        over their windows grown by ``pyramid.margin`` where the stage has pixels, run at the
        trained magnification (``magseg.engine.pyramid.grown_windows``), and where each crop
        sits in its window."""
        crop = self.pyramid.crop
        windows, offsets, extent = grown_windows(boxes, crop, size, self.pyramid.margin_pixels)
        device = self.engine.device
        # Compiled loops by the image's size to read it (what a shrink reads), by the
        # stage's for the rest: the same choice for every crop of a stage, wherever it runs.
        reading = worth_fusing(device, image.size[0] * image.size[1], crop, self.engine.compiled)
        compiled = worth_fusing(device, size[0] * size[1], crop, self.engine.compiled)
        input_size = grown_input(self.pyramid.input, crop, extent)

        def inputs(of: list[Rect]) -> Tensor:
            return backbone_inputs(image, size, of, input_size, self.multiple, compiled=compiled,
                                   reading=reading).to(device)

        probs = input_probs(self.backbone, inputs(windows), input_size, extent,
                            contexts=[inputs(context_windows(windows, r)) for r in self.ratios] or None,
                            precision=self.engine.precision, channels_last=self.engine.channels_last,
                            multiple=self.multiple)
        if self.on_crops:
            self.on_crops(len(boxes))
        return probs, offsets

    def fine(self, image: Source, size: Size, boxes: list[CropBox], store: FineStore | None = None) -> Tensor:
        """The fine view ``(B, classes, ch, cw)`` of crops of ``image`` at ``size``: read
        blended from ``store`` (its stage's first pass, magseg.engine.blend), or each crop's
        own backbone answer cut from its grown window (a stage that does not blend)."""
        if store is not None:
            return store.crops(boxes)
        probs, offsets = self.window_probs(image, size, boxes)
        return cut_crops(probs, offsets, self.pyramid.crop)

    def backbone_batch(self, image: Source, size: Size, boxes: list[CropBox], store: FineStore) -> None:
        """A blending stage's first pass, a batch of crops: their backbone answers over their
        grown windows into ``store``."""
        store.write(boxes, self.window_probs(image, size, boxes)[0])

    def new_store(self, size: Size) -> FineStore | None:
        """An empty ``FineStore`` in memory for a stage of ``size`` that blends, else None."""
        if not blends(size, self.pyramid.crop, self.pyramid.margin_pixels):
            return None
        return FineStore(size, self.pyramid.crop, self.pyramid.margin_pixels, device=self.engine.device)

    def coarse(self, y: StageMap, size: Size, boxes: list[CropBox]) -> Tensor:
        """Y upsampled to ``size`` and cut at ``boxes``: ``(B, C, ch, cw)``."""
        return resample_windows(y, size, crop_windows(boxes, self.pyramid.crop)).to(self.engine.device)

    def first_stage(self, image: Source, size: Size, boxes: list[CropBox], out: StageMap | Sink,
                    store: FineStore | None = None) -> None:
        """Stage 0, a batch of crops: the backbone's probabilities (blended from ``store``
        when the stage blends) into ``out`` (the sink when stage 0 is the only stage and at
        the image size: a plain sliding window)."""
        fine = self.fine(image, size, boxes, store)
        if isinstance(out, Sink):
            out.write(boxes, labels_of(fine), fine if out.wants_probs else None)
        else:
            out.write(boxes, fine)

    def refined_batch(self, image: Source, y: StageMap, size: Size, boxes: list[CropBox],
                      out: StageMap | Sink, picked_map: Tensor | None = None,
                      store: FineStore | None = None) -> None:
        """A stage after the first, a batch of crops: R refines the upsampled Y at the top-K
        pixels of each crop, into ``out`` (the stage's map, or the sink at the last stage);
        the fine view blended from ``store`` when the stage blends."""
        labels_only = isinstance(out, Sink) and not out.wants_probs
        # The refiner's convolutions at the engine's precision (magseg's refiner runs them
        # in bf16 under it, Refiner._small); the per-pixel passes stay float32 whatever it is.
        with precision_context(self.engine.device, self.engine.precision):
            step = self.fused_step(image, y, size, boxes, store, with_weights=not labels_only)
            if step is not None:
                coarse, step = step
                refined, total, raw = step.weights, step.total, step.raw
            elif store is not None and self.refiner is not None:
                coarse, refined, total = self.refined_in_windows(y, size, boxes, store)
                raw = None
            else:
                coarse = self.coarse(y, size, boxes)
                refined, total = refine_weights(self.refiner, self.fine(image, size, boxes, store), coarse)
                raw = None
        if not isinstance(out, Sink):
            picked = refine_crops(coarse, refined, boxes, self.refine, size, total, raw)
            out.write(boxes, coarse)
        elif out.wants_probs:
            picked = refine_crops(coarse, refined, boxes, self.refine, size, total, raw)
            out.write(boxes, labels_of(coarse), coarse)
        else:
            # Labels only: the argmax of R where picked, of Y elsewhere, without the select
            # over C channels, nor R's normalisation.
            labels, picked = refine_labels(coarse, refined, boxes, self.refine, size, total, step)
            out.write(boxes, labels, None)
        if picked_map is not None:
            stitch_crops(picked_map, picked[:, None], boxes)

    def fused_step(self, image: Source, y: StageMap, size: Size, boxes: list[CropBox], store: FineStore | None,
                   with_weights: bool) -> tuple[Tensor, FusedStep] | None:
        """``(coarse, step)``: Y on the crops and the refine step's per-pixel work done in one
        compiled pass (magseg.engine.fused), where the refiner has it and the stage is large
        enough on a CPU; None elsewhere. The refiner's convolutions see each crop's grown
        window through its cells where the stage blends, the crop's own cells where not."""
        refiner = self.refiner
        if not (isinstance(refiner, FusedRefiner) and refiner.context_stride > 1
                and worth_fusing(self.engine.device, size[0] * size[1], self.pyramid.crop, self.engine.compiled)):
            return None
        if store is not None:
            fine, fine_cells, coarse, coarse_cells, offsets = self.window_cells(y, size, boxes, store, compiled=True)
        else:
            fine, coarse = self.fine(image, size, boxes), self.coarse(y, size, boxes)
            stride = refiner.context_stride
            fine_cells, coarse_cells = pool_cells(fine, stride), pool_cells(coarse, stride)
            offsets = [(0, 0)] * len(boxes)
        return coarse, refiner.fused_from_cells(fine_cells, coarse_cells, fine, coarse, offsets, with_weights)

    def window_cells(self, y: StageMap, size: Size, boxes: list[CropBox], store: FineStore, compiled: bool = False
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, list[tuple[int, int]]]:
        """A blending stage's crops and their grown windows' cells, for a ``CellsRefiner``:
        ``(fine, fine_cells, coarse, coarse_cells, offsets)``, the blended fine view and Y on
        the crops ``(B, C, ch, cw)``, both over the windows pooled into cells of
        ``context_stride`` ``(B, C, ceil(eh/s), ceil(ew/s))``, and each crop's place in its
        window. No window is made whole: the fine view's cells are summed from the store's
        answers (``FineStore.crops_and_cells``), Y's window is pooled as it is read, and
        with ``compiled`` both run as compiled loops (``magseg.engine.fused``)."""
        crop, stride = self.pyramid.crop, self.refiner.context_stride
        windows, offsets, _ = grown_windows(boxes, crop, size, self.pyramid.margin_pixels)
        fine, fine_cells = store.crops_and_cells(boxes, stride, compiled)
        made = enlarged_crops_and_cells(y, size, windows, offsets, crop, stride) if compiled else None
        if made is not None:
            return fine, fine_cells, *made, offsets
        coarse = torch.empty_like(fine)
        coarse_cells = torch.empty_like(fine_cells)
        for i, (window, (dy, dx)) in enumerate(zip(windows, offsets)):
            # Y resampled is the same at a pixel whatever window covers it
            # (magseg.engine.resample): the crop's part of its window is the crop's Y.
            part = resample_window(y, size, window).to(self.engine.device)
            coarse_cells[i] = pool_cells(part[None], stride)[0]
            coarse[i] = part[:, dy : dy + crop[0], dx : dx + crop[1]]
        return fine, fine_cells, coarse, coarse_cells, offsets

    def refined_in_windows(self, y: StageMap, size: Size, boxes: list[CropBox], store: FineStore
                           ) -> tuple[Tensor, Tensor, Tensor | None]:
        """A blending stage's refiner, run over the crops' grown windows (the blended fine
        view and Y there) and cut to the crops: its convolutions see the margin's context at
        a crop's border as the backbone's did, instead of zero padding, so its answers on
        either side of a border agree. ``(coarse, refined, total)`` as ``refine_weights``
        gives them, on the crops.

        Magseg's refiner (``CellsRefiner``) sees the windows only pooled into cells
        (``window_cells``), and its per-pixel work runs on the crops."""
        if isinstance(self.refiner, CellsRefiner) and self.refiner.context_stride > 1:
            fine, fine_cells, coarse, coarse_cells, offsets = self.window_cells(y, size, boxes, store)
            return coarse, *self.refiner.weights_from_cells(fine_cells, coarse_cells, fine, coarse, offsets)
        crop = self.pyramid.crop
        windows, offsets, _ = grown_windows(boxes, crop, size, self.pyramid.margin_pixels)
        coarse = resample_windows(y, size, windows).to(self.engine.device)
        refined, total = refine_weights(self.refiner, store.views(boxes, windows), coarse)
        return (cut_crops(coarse, offsets, crop), cut_crops(refined, offsets, crop),
                None if total is None else cut_crops(total[:, None], offsets, crop)[:, 0])

    def kept_batch(self, y: StageMap, size: Size, boxes: list[CropBox], out: StageMap | Sink) -> None:
        """Crops that skip the backbone (adaptive mode, or the final upsampling): Y upsampled."""
        coarse = self.coarse(y, size, boxes)
        if isinstance(out, Sink):
            out.write(boxes, labels_of(coarse), coarse if out.wants_probs else None)
        else:
            out.write(boxes, coarse)

    def chosen(self, y: StageMap, size: Size, boxes: list[CropBox]) -> list[CropBox]:
        """The crops of a stage after the first that run the backbone (all, unless adaptive
        mode drops some; none when K is 0)."""
        if self.refine.points == 0:
            return []
        if not self.engine.adaptive.enabled:
            return boxes
        scores = [score for batch in _batches(boxes, self.engine.batch_size)
                  for score in crop_uncertainty(self.coarse(y, size, batch), batch)]
        return select_crops(scores, boxes, self.engine.adaptive)


Execute = Callable[[list[BatchJob], "Tensor | None"], None]


def run_stages(run: StageRun, image: Source, new_map: Callable[[int, Size], StageMap], sink: Sink,
               trace: list[StageResult] | None = None, execute: Execute | None = None,
               plan: "ClipPlan | None" = None,
               new_store: Callable[[int, Size], FineStore | None] | None = None) -> None:
    """The stage loop over ``image`` (a normalised ``(C_in, H, W)`` source), its result
    written to ``sink`` crop by crop at the image size.

    Each stage is a list of ``BatchJob``s, all done before the next stage starts (they read
    the previous stage's map and write their own crops of the next): ``execute(jobs,
    picked_map)`` does them, by default one after another here (``run_job``); a pool of
    workers may do them anywhere that sees the same image and maps. A stage that blends its
    crops' outputs (magseg.engine.blend) has two such lists: the backbone's answers into a
    ``FineStore``, then the crops that read their blended fine view from it.

    Args:
        new_map: ``new_map(stage, size)``, an empty map for a stage's probabilities.
        trace: when given (maps in memory, local execution), each stage's ``StageResult``.
        plan: run only these crops of each stage (``magseg.engine.clip``: a window of the
            result, which then equals the whole run's there); None runs them all.
        new_store: ``new_store(stage, size)``, an empty ``FineStore`` for a stage that
            blends, None for one that does not (default: ``StageRun.new_store``, in memory).
    """
    in_order = execute is None
    if execute is None:
        def execute(jobs: list[BatchJob], picked_map: Tensor | None) -> None:
            for job in jobs:
                run_job(run, image, job, sink, picked_map)
    if new_store is None:
        def new_store(stage: int, size: Size) -> FineStore | None:
            return run.new_store(size)

    def stage_jobs(s: int, size: Size, kind: str, crops: list[CropBox], y: StageMap | None,
                   out: StageMap | None) -> tuple[list[list[BatchJob]], FineStore | None]:
        """The jobs of a stage's crops that run, as lists for ``execute`` one after another,
        and the stage's ``FineStore`` where it blends: then the backbone's answers go to the
        store, and each crop's step reads its blended view from it. An executor of its own
        may do a list's jobs at once, so it gets them as two lists (a barrier between);
        here they are one list in order, each batch's step right after the answers it reads,
        so a few rows of crops' answers are kept at a time."""
        store = new_store(s, size)
        steps = list(_batches(crops, batch))
        if store is None:
            return [[BatchJob(kind, size, part, y, out) for part in steps]], None
        answers = list(_batches(crops if plan is None else plan.backbone[s], batch))
        store.expect(crops)
        backbone = [BatchJob("backbone", size, part, None, None, store) for part in answers]
        reads = [BatchJob(kind, size, part, y, out, store) for part in steps]
        if not in_order:
            return [backbone, reads], store
        written = {box: j for j, part in enumerate(answers) for box in part}
        # The last batch of answers each step reads (crops adaptive mode skips have none).
        ready = [max((written.get(b, -1) for b in store.grid.sources(part)), default=-1) for part in steps]
        merged, k = [], 0
        for j, job in enumerate(backbone):
            merged.append(job)
            while k < len(reads) and ready[k] <= j:
                merged.append(reads[k])
                k += 1
        return [merged + reads[k:]], store

    sizes = run.pyramid.stage_sizes(tuple(image.size))
    batch = run.engine.batch_size
    y: StageMap | None = None
    done = False  # the last stage wrote the sink
    for s, size in enumerate(sizes):
        start = time.perf_counter()
        boxes = crop_boxes(size, run.pyramid.crop) if plan is None else plan.stages[s]
        last_at_image_size = s == len(sizes) - 1 and tuple(size) == tuple(image.size)
        picked_map = None
        if y is None:
            chosen = boxes
            done = last_at_image_size
            out = None if done else new_map(s, size)
            lists, store = stage_jobs(s, size, "first", boxes, None, out)
            for jobs in lists:
                execute(jobs, None)
            y = out
        else:
            chosen = run.chosen(y, size, boxes)
            if trace is not None:
                picked_map = torch.zeros((1, *size), dtype=torch.bool, device=run.engine.device)
            store = None
            if chosen:
                done = last_at_image_size
                out = None if done else new_map(s, size)
                kept = set(chosen)
                lists, store = stage_jobs(s, size, "refined", chosen, y, out)
                lists[-1] += [BatchJob("kept", size, part, y, out)
                              for part in _batches([b for b in boxes if b not in kept], batch)]
                for jobs in lists:
                    execute(jobs, picked_map)
                y.discard()
                y = out
            # else: nothing changes at this stage; Y stays at its own size, upsampled once at
            # the end (so K = 0 gives exactly the stage-0 view upsampled).
        if store is not None:
            store.discard()
        if trace is not None:
            trace.append(_stage_result(size, y, sink, picked_map, len(chosen), len(boxes), start))
    if not done:
        final = crop_boxes(tuple(image.size), run.pyramid.crop) if plan is None else plan.final
        execute([BatchJob("kept", tuple(image.size), part, y, None) for part in _batches(final, batch)], None)
        y.discard()


def _stage_result(size: Size, y: StageMap | None, sink: Sink, picked_map: Tensor | None,
                  run: int, total: int, start: float) -> StageResult:
    """A stage's ``StageResult`` (maps and sink in memory)."""
    if y is None:  # the last stage wrote the sink
        labels = sink.labels[0]
    else:
        whole = TensorSource(y.read(slice(0, y.size[0]), slice(0, y.size[1])))
        labels = labels_of(resample_windows(whole, size, [Rect.of_size(size)])[0])
    return StageResult(size=tuple(size), labels=labels.cpu(),
                       refined=None if picked_map is None else picked_map[0].cpu(),
                       crops_run=run, crops_total=total, seconds=time.perf_counter() - start)


def stage_probs(
    backbone: nn.Module, scene: Tensor, pyramid: PyramidConfig, engine: EngineConfig = EngineConfig()
) -> Tensor:
    """Backbone probabilities of a whole stage image, tiled into crops and stitched, exactly
    as ``segment`` computes stage 0 (training builds the refiner's coarse input with it).

    Args:
        scene: ``(C_in, h, w)`` normalised image already resized to the stage's size.
    Returns:
        ``(classes, h, w)`` probabilities.
    """
    run = StageRun.create(backbone, pyramid, engine=engine)
    size = tuple(scene.shape[-2:])
    out = MemoryMap(size)
    image, boxes = TensorSource(scene), crop_boxes(size, pyramid.crop)
    store = run.new_store(size)
    if store is not None:
        for part in _batches(boxes, engine.batch_size):
            run.backbone_batch(image, size, part, store)
    for part in _batches(boxes, engine.batch_size):
        run.first_stage(image, size, part, out, store)
    return out.tensor


@torch.inference_mode()
def segment(
    image: Tensor,
    backbone: nn.Module,
    pyramid: PyramidConfig,
    *,
    refiner: nn.Module | None = None,
    refine: RefineConfig = RefineConfig(),
    engine: EngineConfig = EngineConfig(),
    return_probs: bool = False,
    return_stages: bool = False,
    on_crops: Callable[[int], None] | None = None,
    pixel_std: Sequence[float] | None = None,
) -> SegmentationResult:
    """Segment one in-memory image through the scale pyramid.

    Args:
        image: ``(C_in, H, W)`` normalised image, any size.
        backbone: logits model ``(B, C_in, h, w) -> (B, classes, h, w)``, in eval mode.
        pyramid: stage sizes, crop size and backbone input size.
        refiner: the refinement module; None means refined = fine.
        refine: K (count or fraction) and the median-blur kernel.
        engine: batch size, device, precision, channels-last, adaptive mode.
        return_probs: also return the final ``(C, H, W)`` probabilities.
        return_stages: also return per-stage labels and refined-pixel maps.
        on_crops: called with the number of crops each batch ran (for progress bars).
        pixel_std: per band, the normalisation's std, which turns ``image`` back into pixel
            units for the CRF's bilateral kernel (``refine.crf``; None: normalised units).
    Returns:
        a SegmentationResult with ``labels`` ``(H, W)`` uint8.
    """
    if image.dim() != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(image.shape)}")
    device = torch.device(engine.device)
    image = image.to(device=device, dtype=torch.float32)
    run = StageRun.create(backbone, pyramid, refiner=refiner, refine=refine, engine=engine,
                          on_crops=on_crops)
    sink = MemorySink(tuple(image.shape[-2:]), return_probs, device)
    stages: list[StageResult] | None = [] if return_stages else None
    # With the CRF, the engine's final probabilities go to a map first (magseg.engine.crf).
    final = (CrfSink(sink, TensorSource(image), MemoryMap(sink.labels.shape[-2:]), refine.crf, pixel_std,
                     device) if refine.crf.enabled else sink)
    run_stages(run, TensorSource(image), lambda stage, size: MemoryMap(size), final, stages)
    if final is not sink:
        final.finish()
    return SegmentationResult(
        labels=sink.labels[0].cpu(),
        probs=sink.probs.tensor.cpu() if return_probs else None,
        stages=stages or [],
    )

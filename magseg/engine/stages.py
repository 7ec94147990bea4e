"""The progressive engine: MagNet's coarse-to-fine stage loop, written once.

    stage 0:  image resized to scales[0] -> crops -> backbone -> stitched probabilities Y
    stage s:  Y upsampled to scales[s] (crop by crop);  image resized to scales[s] -> crops
              -> backbone O
              R = softmax(refiner(O, Y_crop))       (R = O without a refiner)
              Q = median_blur(cert(R) * (1 - cert(Y_crop)))
              the K pixels of highest Q a crop owns take R's values (point_sample + scatter,
              a masked select as R is on the crop's own grid; Q itself is never made, see
              magseg.engine.certainty.top_error_pixels)
    end:      Y resized to the image size -> argmax (at the image size, the last stage
              takes the argmax crop by crop unless probabilities are asked for)

Crops of a stage all read the upsampled Y of the previous stage and write only the pixels
they own (magseg.engine.pyramid) into the stage's new map, so the result does not depend on batch
size or crop order.
Training uses the same helpers (``crop_probs``, ``refine_probs``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from magseg.config import EngineConfig, PyramidConfig, RefineConfig
from magseg.engine.backbone import context_ratios, input_multiple, run_backbone
from magseg.engine.certainty import certainty
from magseg.engine.precision import precision_context
from magseg.engine.pyramid import (
    CropBox,
    Size,
    Window,
    context_windows,
    crop_boxes,
    crop_windows,
    extract_windows,
    resize,
    resized_windows,
    stitch_crops,
)
from magseg.engine.refine import (
    crop_uncertainty,
    labels_of,
    refine_crops,
    refine_labels,
    select_crops,
)


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


def backbone_inputs(
    image: Tensor, windows: list[Window], ratios: tuple[float, ...] = ()
) -> tuple[Tensor, list[Tensor] | None]:
    """The crops a backbone needs for ``windows`` of ``image`` (C, H, W): the crops
    ``(B, C, h, w)`` and, for a multi-context backbone, one batch of context crops
    ``(B, C, r*h, r*w)`` per ratio ``r`` (None for a plain backbone). Shared by the engine
    and training, so both cut contexts the same way."""
    crops = extract_windows(image, windows)
    if not ratios:
        return crops, None
    return crops, [extract_windows(image, context_windows(windows, r)) for r in ratios]


def crop_probs(
    backbone: nn.Module,
    crops: Tensor,
    input_size: Size,
    *,
    contexts: list[Tensor] | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
    multiple: int | None = None,
) -> Tensor:
    """Backbone probabilities of image crops, at the crops' own resolution.

    Args:
        crops: ``(B, C_in, ch, cw)`` normalised image crops.
        input_size: ``(ih, iw)`` the backbone sees (crops are resized to it and back).
        contexts: context crops for a multi-context backbone, each resized to ``input_size``.
    Returns:
        ``(B, classes, ch, cw)`` float32 probabilities.
    """
    x = resize(crops, input_size)
    if contexts is not None:
        contexts = [resize(c, input_size) for c in contexts]
    if multiple is None:
        multiple = input_multiple(backbone)
    with precision_context(x.device, precision):
        logits = run_backbone(backbone, x, multiple, contexts, channels_last)
    # Back to NCHW: everything after the backbone (softmax, resize, refiner, certainty, top-K)
    # reduces over or gathers along channels, which is slow in the channels-last layout
    # (with it, the engine's own share of a 2448 px scene doubled).
    logits = logits.float().contiguous()
    # Softmax at the input size, then resize: fewer pixels when crops are larger than the
    # input, and bilinear weights sum to 1, so the result is still a distribution.
    return resize(logits.softmax(dim=1), tuple(crops.shape[-2:]))


def refine_probs(refiner: nn.Module | None, fine: Tensor, coarse: Tensor) -> Tensor:
    """R: the refiner's probabilities, or ``fine`` itself when there is no refiner.

    Args:
        fine, coarse: ``(B, C, h, w)`` probabilities.
    """
    if refiner is None:
        return fine
    if hasattr(refiner, "probs"):  # magseg's Refiner: probabilities without a log pass
        return refiner.probs(fine, coarse).float()
    return refiner(fine, coarse).float().softmax(dim=1)


def _batches(items: Sequence[CropBox], size: int) -> Iterator[list[CropBox]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _run_options(backbone: nn.Module, engine: EngineConfig) -> dict:
    """What every backbone call of a run needs, worked out once."""
    return dict(
        precision=engine.precision, channels_last=engine.channels_last,
        multiple=input_multiple(backbone), ratios=context_ratios(backbone),
    )


def _batch_probs(
    backbone: nn.Module, scene: Tensor, boxes: list[CropBox], pyramid: PyramidConfig, run: dict
) -> Tensor:
    """Backbone probabilities ``(B, classes, ch, cw)`` of a batch of crops of a stage image."""
    crops, contexts = backbone_inputs(scene, crop_windows(boxes, pyramid.crop), run["ratios"])
    return crop_probs(
        backbone, crops, pyramid.input, contexts=contexts, precision=run["precision"],
        channels_last=run["channels_last"], multiple=run["multiple"],
    )


def _stitched_probs(
    backbone: nn.Module,
    scene: Tensor,
    boxes: Sequence[CropBox],
    pyramid: PyramidConfig,
    engine: EngineConfig,
    run: dict,
    on_crops: Callable[[int], None] | None,
) -> Tensor:
    """Backbone probabilities of a whole stage image ``(C_in, h, w)``, crops stitched:
    ``(classes, h, w)``."""
    out: Tensor | None = None
    for batch in _batches(boxes, engine.batch_size):
        fine = _batch_probs(backbone, scene, batch, pyramid, run)
        if out is None:
            out = scene.new_zeros((fine.shape[1], *scene.shape[-2:]))
        stitch_crops(out, fine, batch)
        if on_crops:
            on_crops(len(batch))
    assert out is not None  # crop_boxes never returns an empty list
    return out


def _coarse_crops(y: Tensor, size: Size, boxes: list[CropBox], pyramid: PyramidConfig) -> Tensor:
    """Y, the running ``(C, h, w)`` probabilities, upsampled to a stage's ``size`` and cut
    at ``boxes``: ``(B, C, ch, cw)``, made crop by crop (``resized_windows``)."""
    return resized_windows(y, size, crop_windows(boxes, pyramid.crop))


def _refined_stage(
    y: Tensor,
    size: Size,
    scene: Tensor,
    boxes: list[CropBox],
    chosen: list[CropBox],
    backbone: nn.Module,
    refiner: nn.Module | None,
    pyramid: PyramidConfig,
    refine: RefineConfig,
    engine: EngineConfig,
    run: dict,
    *,
    labels_only: bool,
    picked_map: Tensor | None,
    on_crops: Callable[[int], None] | None,
) -> Tensor:
    """One stage after the first: the ``chosen`` crops of ``scene`` (the image at ``size``)
    refine the previous stage's ``y`` (C, h, w); the other boxes keep ``y`` upsampled.

    Every crop reads ``y`` and writes only the pixels it owns into a new map, so overlapping
    crops never see each other's refinements: the result does not depend on batch size or
    order.

    Returns:
        the stage's ``(C, H, W)`` probabilities, or with ``labels_only`` its ``(H, W)`` uint8
        labels (argmax crop by crop, while the crop is at hand).
    """
    if labels_only:
        out = torch.empty((1, *size), dtype=torch.uint8, device=y.device)
    else:
        out = y.new_empty((y.shape[0], *size))

    for batch in _batches(chosen, engine.batch_size):
        coarse = _coarse_crops(y, size, batch, pyramid)
        fine = _batch_probs(backbone, scene, batch, pyramid, run)
        refined = refine_probs(refiner, fine, coarse)
        if labels_only:
            labels, picked = refine_labels(coarse, refined, batch, refine)
            stitch_crops(out, labels[:, None], batch)
        else:
            picked = refine_crops(coarse, refined, batch, refine)
            stitch_crops(out, coarse, batch)
        if picked_map is not None:
            stitch_crops(picked_map, picked[:, None], batch)
        if on_crops:
            on_crops(len(batch))
    kept = set(chosen)
    for batch in _batches([b for b in boxes if b not in kept], engine.batch_size):
        coarse = _coarse_crops(y, size, batch, pyramid)
        stitch_crops(out, labels_of(coarse)[:, None] if labels_only else coarse, batch)
    return out[0] if labels_only else out


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
    run = _run_options(backbone, engine)
    boxes = crop_boxes(tuple(scene.shape[-2:]), pyramid.crop)
    return _stitched_probs(backbone, scene, boxes, pyramid, engine, run, None)


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
    Returns:
        a SegmentationResult with ``labels`` ``(H, W)`` uint8.
    """
    if image.dim() != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(image.shape)}")
    device = torch.device(engine.device)
    image = image.to(device=device, dtype=torch.float32)
    height, width = image.shape[-2:]
    run = _run_options(backbone, engine)

    y: Tensor | None = None  # the running (C, h, w) probabilities, at the last stage that ran
    labels: Tensor | None = None  # (H, W), when the last stage wrote labels instead of y
    sizes = pyramid.stage_sizes((height, width))
    stages: list[StageResult] = []
    for s, size in enumerate(sizes):
        start = time.perf_counter()
        boxes = crop_boxes(size, pyramid.crop)
        picked_map = None
        if y is None:
            # Stage 0: the coarse view, stitched from its crops (one crop when scales[0] = crop).
            chosen = boxes
            y = _stitched_probs(backbone, resize(image, size), chosen, pyramid, engine, run, on_crops)
        else:
            chosen = [] if refine.points == 0 else boxes
            if chosen and engine.adaptive.enabled:
                scores = [score for batch in _batches(boxes, engine.batch_size)
                          for score in crop_uncertainty(_coarse_crops(y, size, batch, pyramid), batch)]
                chosen = select_crops(scores, boxes, engine.adaptive)
            if return_stages:
                picked_map = torch.zeros((1, *size), dtype=torch.bool, device=device)
            if chosen:
                # The last stage at the image size, when only labels are asked for, writes
                # labels crop by crop: the full-size probability map is never made.
                labels_only = s == len(sizes) - 1 and tuple(size) == (height, width) and not return_probs
                out = _refined_stage(
                    y, size, resize(image, size), boxes, chosen, backbone, refiner, pyramid, refine,
                    engine, run, labels_only=labels_only, picked_map=picked_map, on_crops=on_crops,
                )
                if labels_only:
                    labels = out
                else:
                    y = out
            # else: nothing can change at this stage; y stays at its own resolution and is
            # upsampled once, later (so K = 0 gives exactly the stage-0 view upsampled).
        if return_stages:
            stages.append(
                StageResult(
                    size=tuple(size),
                    labels=(labels if labels is not None else labels_of(resize(y, size))).cpu(),
                    refined=None if picked_map is None else picked_map[0].cpu(),
                    crops_run=len(chosen),
                    crops_total=len(boxes),
                    seconds=time.perf_counter() - start,
                )
            )

    probs = None
    if labels is None:
        probs = resize(y, (height, width))
        labels = labels_of(probs)
    return SegmentationResult(
        labels=labels.cpu(),
        probs=probs.cpu() if return_probs else None,
        stages=stages,
    )

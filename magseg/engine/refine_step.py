"""The refine step of a stage after the first (config section `refine`): which crops run,
which pixels take R, the refiner network's output (`magseg.engine.refiner_network`).

    crop selection (adaptive mode): mean coarse uncertainty per crop -> the most uncertain
    picked pixels: the top K of each crop's error map among the pixels it owns
    refine:        the picked pixels take R's values (probabilities) or R's argmax (labels)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from magseg.config import AdaptiveConfig, RefineConfig
from magseg.engine.certainty import certainty, error_score, error_score_and_tops, top_error_pixels
from magseg.engine.pyramid import CropBox, Size, owned_mask
from magseg.engine.resample import row_bands

if TYPE_CHECKING:
    from magseg.engine.fused import FusedStep


def labels_of(probs: Tensor, best: Tensor | None = None) -> Tensor:
    """``(C, H, W)`` or ``(B, C, H, W)`` probabilities -> ``(H, W)`` or ``(B, H, W)`` uint8
    class ids: argmax over C, the first maximum on ties (a NaN pixel gets id C).

    ``best``: the maximum over C when the caller has it already (``certainty.top2``).

    On the CPU an index-returning reduction over a non-innermost dimension is an order of
    magnitude slower than a value reduction such as ``amax`` (docs/performance.md). So:
    ``key[c] = c`` where class c reaches the maximum, ``C + c`` elsewhere, and the id is the
    smallest key: two value passes instead of an index reduction.
    """
    classes = probs.shape[-3]
    if classes > 127:  # C + c must fit in uint8
        return probs.max(dim=-3).indices.to(torch.uint8)
    best = probs.amax(dim=-3) if best is None else best
    key = torch.ne(probs, best.unsqueeze(-3)).view(torch.uint8).mul_(classes)
    key += torch.arange(classes, dtype=torch.uint8, device=probs.device).view(classes, 1, 1)
    return key.amin(dim=-3)


def num_points(points: int | float, available: int) -> int:
    """K for a crop with ``available`` candidate pixels: an int is a count, a float a fraction."""
    if isinstance(points, float):
        return min(available, round(points * available))
    return min(available, int(points))


def crop_uncertainty(coarse: Tensor, boxes: Sequence[CropBox]) -> list[float]:
    """Adaptive mode's crop score: the mean coarse uncertainty ``1 - cert(Y)`` over the
    pixels each crop owns.

    Args:
        coarse: ``(B, C, ch, cw)`` the upsampled previous-stage probabilities of B crops.
    Returns:
        B scores in [0, 1].
    """
    uncertainty = 1 - certainty(coarse)
    return [float(u[box.owned_in_crop].mean()) for u, box in zip(uncertainty, boxes)]


def select_crops(scores: Sequence[float], boxes: Sequence[CropBox], adaptive: AdaptiveConfig) -> list[CropBox]:
    """Adaptive mode: the crops worth running through the backbone at a stage.

    Crops scoring below ``threshold`` are dropped and of the rest only the ``max_crops``
    *most* uncertain are kept (descending order: the official MagNet-Fast sorts the wrong way).

    Args:
        scores: one ``crop_uncertainty`` per box.
    Returns:
        the kept boxes, in their original (row-major) order.
    """
    if not adaptive.enabled:
        return list(boxes)
    order = sorted(range(len(boxes)), key=lambda i: scores[i], reverse=True)
    if adaptive.threshold is not None:
        order = [i for i in order if scores[i] >= adaptive.threshold]
    if adaptive.max_crops is not None:
        order = order[: adaptive.max_crops]
    return [boxes[i] for i in sorted(order)]


def border_band(boxes: Sequence[CropBox], crop: Size, size: Size, width: int,
                device: torch.device | None = None) -> Tensor:
    """``(B, ch, cw)`` bool: the pixels each crop owns within ``width`` of an edge of its
    owned region that borders another crop (not the image's edge) in a stage of ``size``."""
    band = torch.zeros((len(boxes), *crop), dtype=torch.bool, device=device)
    for i, b in enumerate(boxes):
        rows, cols = b.owned_in_crop
        y0, y1, x0, x1 = rows.start, rows.stop, cols.start, cols.stop
        if b.owned.top > 0:
            band[i, y0 : y0 + width, x0:x1] = True
        if b.owned.bottom < size[0]:
            band[i, max(y1 - width, y0) : y1, x0:x1] = True
        if b.owned.left > 0:
            band[i, y0:y1, x0 : x0 + width] = True
        if b.owned.right < size[1]:
            band[i, y0:y1, max(x1 - width, x0) : x1] = True
    return band


def picked_pixels(
    coarse: Tensor, refined: Tensor, boxes: Sequence[CropBox], refine: RefineConfig,
    size: Size | None = None, total: Tensor | None = None,
) -> Tensor:
    """The pixels that take the refined values: the top-K of each crop's error map, among
    the pixels the crop owns (K counts only those). With ``refine.border`` (and the stage
    ``size``), pixels near a crop border are picked only once every other owned pixel is.

    Args:
        coarse, refined: ``(B, C, ch, cw)`` probabilities Y and R of the crops (R up to the
            per-pixel factor ``total``, ``(B, ch, cw)``, when given: ``error_score``).
        boxes: the B crop boxes.
    Returns:
        ``(B, ch, cw)`` bool.
    """
    return top_k_owned(error_score(refined, coarse, total), boxes, refine, size)


def top_k_owned(raw: Tensor, boxes: Sequence[CropBox], refine: RefineConfig,
                size: Size | None = None) -> Tensor:
    """``picked_pixels`` from the unblurred error score ``raw`` ``(B, ch, cw)``."""
    crop = tuple(raw.shape[-2:])
    ks = [num_points(refine.points, box.owned.height * box.owned.width) for box in boxes]
    # Crops that own every pixel (inside the image, no overlap) need no mask.
    owns_all = all(box.owned.size == crop for box in boxes)
    owned = None if owns_all else owned_mask(list(boxes), crop, device=raw.device)
    if not refine.border or size is None:
        return top_error_pixels(raw, refine.kernel, ks, owned)
    # The border term: the inner pixels first, then the band for what K has left.
    if owned is None:
        owned = torch.ones((len(boxes), *crop), dtype=torch.bool, device=raw.device)
    band = border_band(boxes, crop, size, refine.border, raw.device) & owned
    inner = owned & ~band
    counts = inner.flatten(1).sum(1).tolist()
    first = [min(k, n) for k, n in zip(ks, counts)]
    picked = top_error_pixels(raw, refine.kernel, first, inner)
    rest = [k - f for k, f in zip(ks, first)]
    if any(rest):
        picked |= top_error_pixels(raw, refine.kernel, rest, band)
    return picked


def refine_crops(
    coarse: Tensor, refined: Tensor, boxes: Sequence[CropBox], refine: RefineConfig,
    size: Size | None = None, total: Tensor | None = None, raw: Tensor | None = None,
) -> Tensor:
    """Give the top-K pixels of each crop's error map the refined values, in place.

    Args:
        coarse: ``(B, C, ch, cw)`` coarse probabilities Y of the crops; overwritten with
            the result (the engine's own copy, cut for this batch).
        refined: ``(B, C, ch, cw)`` refined probabilities R, or with ``total`` ``(B, ch,
            cw)`` R up to that per-pixel factor (``R = refined / total``; ``refined`` is then
            divided in place).
        boxes: the B crop boxes (K counts, and picks, only pixels a crop owns).
        raw: ``(B, ch, cw)`` the unblurred error score of R and Y, when made already
            (``magseg.engine.fused``).
    Returns:
        ``(B, ch, cw)`` bool map of the pixels that took the refined values.
    """
    if raw is None:
        picked = picked_pixels(coarse, refined, boxes, refine, size, total)
    else:
        picked = top_k_owned(raw, boxes, refine, size)
    if total is not None:
        # A total of 0 (every weight underflowed) would make R 0/0 = NaN, which the lerp
        # below would carry into unpicked pixels too (0 * NaN); such a pixel's R is 0 instead.
        refined = refined.div_(total.clamp_min(torch.finfo(total.dtype).tiny).unsqueeze(1))
    # R lives on the crop's own grid, so point_sample at the pixel centres followed by a
    # scatter is a masked select: one pass over the C channels (a test checks they agree).
    # As a lerp with weight 0 or 1, which gives Y or R exactly (ATen's lerp computes
    # ``b - (b - a) * (1 - w)`` for w >= 0.5), at about a quarter of the time of a `where`
    # whose one-channel mask is broadcast over C (docs/performance.md).
    coarse.lerp_(refined, picked[:, None].to(coarse.dtype))
    return picked


def refine_labels(
    coarse: Tensor, refined: Tensor | None, boxes: Sequence[CropBox], refine: RefineConfig,
    size: Size | None = None, total: Tensor | None = None, step: "FusedStep | None" = None,
) -> tuple[Tensor, Tensor]:
    """``refine_crops`` for a stage that keeps only labels: ``labels_of`` its result,
    ``(B, ch, cw)`` uint8, and the picked map; ``coarse`` and ``refined`` left as they are.

    The argmax of R where picked and of Y elsewhere: two argmaxes and a select over one uint8
    channel move less memory than a select over C float channels followed by an argmax. Each
    argmax reuses the top-1 the error score's certainties found, and R is never normalised
    (its argmax is that of ``refined``; its certainty, that of ``refined`` over ``total``).
    ``step``: the error score and both argmaxes made already in one pass
    (``magseg.engine.fused``; ``refined`` is then not read).
    """
    if step is not None:
        picked = top_k_owned(step.raw, boxes, refine, size)
        return torch.where(picked, step.refined_labels, step.coarse_labels), picked
    batch, _, height, width = coarse.shape
    raw = coarse.new_empty((batch, height, width))
    refined_labels = torch.empty((batch, height, width), dtype=torch.uint8, device=coarse.device)
    coarse_labels = torch.empty_like(refined_labels)
    # Band by band of rows: the error score and both argmaxes read each band of R and Y
    # while it is still in the cache (a whole batch's C-channel map is larger than the L3 of
    # a server CPU). Every op is per pixel, so the bands give the whole map's values exactly.
    for rows in row_bands(coarse):
        r, best, coarse_best = error_score_and_tops(
            refined[:, :, rows], coarse[:, :, rows], None if total is None else total[:, rows])
        raw[:, rows] = r
        refined_labels[:, rows] = labels_of(refined[:, :, rows], best)
        coarse_labels[:, rows] = labels_of(coarse[:, :, rows], coarse_best)
    picked = top_k_owned(raw, boxes, refine, size)
    return torch.where(picked, refined_labels, coarse_labels), picked


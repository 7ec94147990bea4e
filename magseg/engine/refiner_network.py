"""The refiner network (config section `refiner`): fine and coarse class maps in, refined
logits out. The refine step that decides which pixels take its output is
`magseg.engine.refine_step` (config section `refine`).

MagNet's refiner is a full-resolution conv net with 64-128 channels; on a CPU it costs more
than the backbone. This one keeps the interface (the two C-channel probability maps,
concatenated fine first) but does its learned work at 1/``context_stride`` of the crop's
resolution, where 3x3 convolutions (one dilated) see a neighbourhood of about 10 * stride
pixels, and returns

    refined logits = log(fine) + gate * upsample(correction)

A residual in log-probability space, weighted per pixel at full resolution by ``gate`` in
[0, 1]. The correction is learned from the coarse map and the surroundings; at 1/stride it
is smooth, so it cannot follow anything narrower than about ``stride`` pixels, and on its
own it can push a small object the fine view found (a 10 px building) towards the
background around it. The gate (``RefinerGate``) decides from three full-resolution cues whether a
pixel keeps its fine prediction or takes the correction: the fine certainty (top-1 minus
top-2), the fine-vs-coarse disagreement, and the fine map's detail that the 1/stride view
cannot represent. It starts out closed where the fine map has such detail and open in
smooth regions (two fields that look alike up close), and is trained with the correction.

The last convolution of the correction starts at zero, so an untrained refiner returns the
fine prediction exactly, whatever the gate, and training only has to learn the correction.
A learned full-resolution branch over the class maps would cost more on a CPU than all the
rest of the refinement together; the gate's cues are a few per-pixel reductions instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magseg.engine.certainty import certainty
from magseg.engine.fused import FusedStep, refine_pass
from magseg.engine.resample import edge_padded, enlarge, enlarge_columns, enlarge_rows, pool_cells, row_bands

# Floor for log-probabilities; keeps log(0) finite.
_EPS = 1e-6


class RefinerLike(Protocol):
    """What the engine runs as R, the refinement module: ``refiner(fine, coarse) -> logits``.

    ``fine``: ``(B, C, h, w)`` probabilities of the stage's crops at their own resolution;
    ``coarse``: ``(B, C, h, w)`` probabilities of the same crops from the previous stage's
    map, resized to ``(h, w)``. Returns ``(B, C, h, w)`` refined logits; the engine takes
    their softmax. Magseg's ``Refiner`` is one; any ``nn.Module`` with this call is another.
    (Named ``RefinerLike`` because ``Refiner`` is magseg's own module, below.)
    """

    def __call__(self, fine: Tensor, coarse: Tensor, /) -> Tensor: ...


@runtime_checkable
class ProbsRefiner(RefinerLike, Protocol):
    """A refiner that also returns probabilities directly: ``refiner.probs(fine, coarse)``
    ``-> (B, C, h, w)``, the same distribution as ``softmax(refiner(fine, coarse))`` without
    the full-resolution log and softmax passes. The engine uses ``probs`` when a refiner has it (``isinstance(refiner,
    ProbsRefiner)``), and the softmax of the logits otherwise."""

    def probs(self, fine: Tensor, coarse: Tensor, /) -> Tensor: ...


@runtime_checkable
class WeightsRefiner(ProbsRefiner, Protocol):
    """A refiner that also returns its probabilities up to a per-pixel positive factor:
    ``refiner.weights(fine, coarse)`` ``-> (B, C, h, w)``, whose per-pixel normalisation is
    ``probs``. The engine's refine step uses them when a refiner has them: the top-K and
    the argmax need no full normalisation pass."""

    def weights(self, fine: Tensor, coarse: Tensor, /) -> Tensor: ...


@runtime_checkable
class TotalRefiner(WeightsRefiner, Protocol):
    """A refiner that returns its weights with their per-pixel sum over the channels:
    ``refiner.weights_and_total(fine, coarse)`` ``-> ((B, C, h, w), (B, h, w))``."""

    def weights_and_total(self, fine: Tensor, coarse: Tensor, /) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class CellsRefiner(TotalRefiner, Protocol):
    """A refiner whose learned part sees windows pooled into cells of ``context_stride``
    pixels, and whose answer on the crops they hold needs only those cells and the crops:
    ``refiner.weights_from_cells(fine_cells, coarse_cells, fine, coarse, offsets)``
    (``Refiner.weights_from_cells``)."""

    context_stride: int

    def weights_from_cells(self, fine_cells: Tensor, coarse_cells: Tensor, fine: Tensor, coarse: Tensor,
                           offsets: list[tuple[int, int]], /) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class FusedRefiner(CellsRefiner, Protocol):
    """A ``CellsRefiner`` whose per-pixel work and the refine step's run as one compiled pass
    on a CPU: ``refiner.fused_from_cells(fine_cells, coarse_cells, fine, coarse, offsets,
    with_weights)`` ``-> magseg.engine.fused.FusedStep`` (``Refiner.fused_from_cells``)."""

    def fused_from_cells(self, fine_cells: Tensor, coarse_cells: Tensor, fine: Tensor, coarse: Tensor,
                         offsets: list[tuple[int, int]], with_weights: bool, /) -> FusedStep: ...


def refiner_input(fine: Tensor, coarse: Tensor) -> Tensor:
    """The one channel order shared by training and inference: ``cat([fine, coarse])``.

    Args:
        fine, coarse: ``(B, C, H, W)`` probabilities.
    Returns:
        ``(B, 2C, H, W)``.
    """
    if fine.shape != coarse.shape:
        raise ValueError(f"fine {tuple(fine.shape)} and coarse {tuple(coarse.shape)} differ")
    return torch.cat([fine, coarse], dim=1)


def gate_cues(fine: Tensor, coarse: Tensor, smooth: Tensor) -> Tensor:
    """The gate's three full-resolution cues, each in [0, 1]: ``(B, 3, H, W)``.

    - certainty: top-1 minus top-2 of ``fine`` (a sure fine pixel should keep its class);
    - disagreement: total variation distance between ``fine`` and ``coarse`` (where they
      disagree, either the coarse view missed something small or the fine view lacks the
      context);
    - detail: total variation distance between ``fine`` and ``smooth``, the fine map as
      the correction's 1/stride grid sees it (large on small objects and thin lines, which
      a correction at that grid cannot follow).
    """
    return torch.stack([certainty(fine), _tv_distance(fine, coarse), _tv_distance(fine, smooth)], dim=1)


def _tv_distance(p: Tensor, q: Tensor) -> Tensor:
    """``0.5 * sum_c |p - q|``: ``(B, H, W)``; one full-size buffer, reused in place."""
    return (p - q).abs_().sum(dim=1).mul_(0.5)


class RefinerGate(nn.Module):
    """Per-pixel weight of the correction: ``sigmoid(w . cues + b)``, ``(B, 1, H, W)``.

    Four numbers: at full resolution only per-pixel arithmetic runs, so the gate adds
    little to the engine's time. Initialised to keep the fine prediction where it has
    detail the correction's grid cannot follow (detail 0.5, certainty 1: gate 0.05; a small
    object, a thin line), and to take the correction in smooth regions (gate 0.73 where the
    fine view is sure, 0.95 where it hesitates): there, the coarse view's context is what
    the correction brings (two fields that look alike up close, told apart by their
    margins), even against a confident fine view. Training moves them. They are
    stored divided by ``SCALE``: Adam's steps are about the learning rate per parameter
    whatever the gradient, and a refiner phase of a few hundred steps must be able to move
    a gate logit by several units (to open it where the fine view is confidently wrong).
    """

    SCALE = 10.0

    def __init__(self) -> None:
        super().__init__()
        # certainty, disagreement, detail
        self.weight = nn.Parameter(torch.tensor([-2.0, 0.0, -8.0]) / self.SCALE)
        self.bias = nn.Parameter(torch.tensor(3.0) / self.SCALE)

    def forward(self, cues: Tensor) -> Tensor:
        weight = (self.weight * self.SCALE).view(1, -1, 1, 1)
        logit = (cues * weight).sum(dim=1, keepdim=True).add_(self.bias * self.SCALE)
        return logit.sigmoid_()

    def coefficients(self) -> tuple[float, float, float, float]:
        """The gate's logit as numbers: ``(w_certainty, w_disagreement, w_detail, bias)``."""
        w0, w1, w2 = (float(v) * self.SCALE for v in self.weight)
        return w0, w1, w2, float(self.bias) * self.SCALE

    def from_maps(self, fine: Tensor, coarse: Tensor, smooth: Tensor) -> Tensor:
        """``forward(gate_cues(fine, coarse, smooth))`` without autograd, accumulated in
        place on one ``(B, 1, H, W)`` buffer (the engine's path: no stacked cues). ``fine``,
        ``coarse`` and ``smooth`` are distributions over the channels; ``smooth`` is
        overwritten."""
        w0, w1, w2, bias = self.coefficients()
        logit = certainty(fine).mul_(w0).add_(bias)
        if w1:
            logit.add_(_tv_distance(fine, coarse), alpha=w1)
        if w2:
            # smooth is the engine's scratch (a slice of the upsampled buffer), and both maps
            # are distributions: 0.5 * sum |p - q| = 1 - sum min(p, q), one pass fewer.
            overlap = torch.minimum(fine, smooth, out=smooth).sum(dim=1)
            logit.add_(overlap.neg_().add_(1), alpha=w2)
        return logit.sigmoid_()[:, None]


class Refiner(nn.Module):
    """Refines fine probabilities using coarse ones: ``(B, C, H, W) x 2 -> (B, C, H, W)`` logits.

    ``gate=False`` builds the correction alone (refined = log fine + correction everywhere),
    as a checkpoint without gate weights holds it.
    """

    def __init__(self, classes: int, channels: int = 32, context_stride: int = 4, gate: bool = True) -> None:
        super().__init__()
        self.classes = classes
        self.context_stride = context_stride
        self.context = nn.Sequential(
            nn.Conv2d(2 * classes, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=2, dilation=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, classes, 1),
        )
        nn.init.zeros_(self.context[-1].weight)
        nn.init.zeros_(self.context[-1].bias)
        self.gate = RefinerGate() if gate else None
        # What runs ``context`` at inference on a CPU in its place: the int8 graph of these
        # weights (``magseg.engine.int8.RefinerInt8``, attached by the Segmenter at
        # engine.precision=int8 where ``magseg quantize`` made one); None: torch.
        self.int8_convolutions: Callable[[Tensor], Tensor] | None = None

    def _pooled(self, fine: Tensor, coarse: Tensor) -> tuple[Tensor, Tensor]:
        s = self.context_stride
        if s == 1:
            return fine, coarse
        # Pooling commutes with concatenation: pool first, concatenate small maps.
        return pool_cells(fine, s), pool_cells(coarse, s)

    def _full_size(self, delta: Tensor, like: Tensor) -> Tensor:
        """``delta`` at 1/stride (ceil-mode cells) enlarged ``stride`` times and cut to
        ``like``'s size: cell centres land on the centres of the pixels they pooled, however
        the size divides (a resize to the exact size would stretch 77 cells over 612 px, off
        by half a cell at the far edge). Inference takes ``magseg.engine.resample.enlarge``,
        the same values as the interpolation up to rounding, at about half its cost."""
        s = self.context_stride
        if s == 1:
            return delta
        height, width = like.shape[-2:]
        if torch.is_grad_enabled():
            full = F.interpolate(delta, scale_factor=s, mode="bilinear", align_corners=False)
            return full[..., :height, :width].contiguous()
        return enlarge(delta, s, (height, width))

    def _delta_and_gate(self, fine: Tensor, coarse: Tensor, shift: bool) -> tuple[Tensor, Tensor | None]:
        """The full-size correction (its per-pixel max subtracted with ``shift``) and the
        gate (None without one). The correction and the pooled fine map are upsampled in
        one call: the gate's detail cue needs the latter at full size."""
        small_fine, small_coarse = self._pooled(fine, coarse)
        delta = self._convolved(refiner_input(small_fine, small_coarse))
        if shift:  # exp never overflows; the per-pixel shift cancels in the ratio
            delta = delta - delta.amax(dim=1, keepdim=True)
        if self.gate is None:
            return self._full_size(delta, fine), None
        both = self._full_size(torch.cat([delta, small_fine], dim=1), fine)
        delta, smooth = both[:, : self.classes], both[:, self.classes :]
        if not torch.is_grad_enabled():  # inference: the same numbers, fewer full-size passes
            return delta, self.gate.from_maps(fine, coarse, smooth)
        with torch.no_grad():  # the cues are data: functions of the inputs, not of weights
            cues = gate_cues(fine.detach(), coarse.detach(), smooth.detach())
        return delta, self.gate(cues)

    def gate_map(self, fine: Tensor, coarse: Tensor) -> Tensor:
        """The gate at full resolution, ``(B, 1, H, W)`` (ones without a gate)."""
        gate = self._delta_and_gate(fine, coarse, shift=False)[1]
        return torch.ones_like(fine[:, :1]) if gate is None else gate

    def forward(self, fine: Tensor, coarse: Tensor) -> Tensor:
        """Refined logits (for training); ``softmax`` of them equals ``fine`` while the last
        conv is zero."""
        delta, gate = self._delta_and_gate(fine, coarse, shift=False)
        if gate is not None:
            delta = delta * gate
        return fine.clamp_min(_EPS).log() + delta

    def weights(self, fine: Tensor, coarse: Tensor) -> Tensor:
        """The refined probabilities up to a per-pixel factor: ``fine * exp(gate * delta)``
        with the correction shifted to a per-pixel maximum of 0, ``(B, C, H, W)``; ``probs``
        divides them by their per-pixel sum over the sum of ``fine``. The engine takes
        these: its argmax needs no normalisation and its certainty one channel's.

        With the shift, gate * delta <= 0, so exp stays <= 1 whatever the gate. While the
        correction is zero, the result is ``fine`` bit for bit."""
        return self._weights(fine, coarse, with_total=False)[0]

    def weights_and_total(self, fine: Tensor, coarse: Tensor) -> tuple[Tensor, Tensor]:
        """``weights`` and their per-pixel sum over the channels, ``(B, H, W)`` (what the
        refine step takes: ``magseg.engine.stages.refine_weights``)."""
        weights, total = self._weights(fine, coarse, with_total=True)
        return weights, total

    def _weights(self, fine: Tensor, coarse: Tensor, with_total: bool) -> tuple[Tensor, Tensor | None]:
        """``weights`` (and their sum over the channels with ``with_total``).

        Inference at a stride > 1 works band by band of rows (``magseg.engine.resample.
        row_bands``): the correction and the pooled fine map are enlarged a band at a time
        (``enlarge_rows``) and the gate, the exponential, the product with ``fine`` and the
        sum read each band while it is in the cache, instead of a dozen passes over a
        batch's full-size maps, tens of MB each. Every step is per pixel, so the values are
        those of the whole-map arithmetic, bit for bit."""
        s = self.context_stride
        if torch.is_grad_enabled() or s == 1:
            delta, gate = self._delta_and_gate(fine, coarse, shift=True)
            if gate is not None:
                delta = delta.mul_(gate)  # a view of the upsampled buffer: in place
            weights = delta.exp_().mul_(fine)
            return weights, weights.sum(dim=1) if with_total else None
        height, width = fine.shape[-2:]
        small = self._small(*self._pooled(fine, coarse))
        columns = edge_padded(enlarge_columns(small, s, slice(0, width)), small.dim() - 2)
        weights = torch.empty_like(fine)
        total = fine.new_empty((fine.shape[0], height, width)) if with_total else None
        for rows in row_bands(fine, multiple=s):
            self._band(enlarge_rows(columns, s, rows), fine[:, :, rows], coarse[:, :, rows],
                       weights[:, :, rows], None if total is None else total[:, rows])
        return weights, total

    def weights_from_cells(self, fine_cells: Tensor, coarse_cells: Tensor, fine: Tensor, coarse: Tensor,
                           offsets: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """Inference's ``weights_and_total`` over windows around crops, from the windows'
        cells and the crops alone: the correction sees the whole window (its convolutions
        the context around a crop), the per-pixel work runs on the crop's pixels only, and
        no window is made at full size (``magseg.engine.blend.FineStore.crops_and_cells``
        pools the blended view without building it).

        Args:
            fine_cells, coarse_cells: ``(B, C, ceil(eh/s), ceil(ew/s))``, the windows
                pooled by ``pool_cells`` at ``context_stride`` s > 1 (cells from each
                window's origin).
            fine, coarse: ``(B, C, ch, cw)`` the crops' probabilities.
            offsets: ``(dy, dx)`` of each crop in its window.
        Returns:
            ``(B, C, ch, cw)`` weights and ``(B, ch, cw)`` their sum over the channels: the
            crops' part of ``weights_and_total`` over the windows. Every step after the
            correction is per pixel and each band is enlarged from the same cells: the same
            values but for the last bit where ATen's vector loops leave a scalar remainder
            elsewhere.
        """
        s = self.context_stride
        batch, _, ch, cw = fine.shape
        small = self._small(fine_cells, coarse_cells)
        weights = torch.empty_like(fine)
        total = fine.new_empty((batch, ch, cw))
        for i, (dy, dx) in enumerate(offsets):
            # Columns from the cell edge at or before the crop's (enlarged bands start on
            # one), cut to the crop before the rows are enlarged: rows mix no columns.
            x0 = dx // s * s
            enlarged = enlarge_columns(small[i : i + 1], s, slice(x0, dx + cw))
            columns = edge_padded(enlarged[..., dx - x0 :].contiguous(), 2)
            y0 = dy // s * s
            for band in row_bands(fine[i : i + 1], multiple=s, height=dy + ch - y0):
                top, bottom = y0 + band.start, y0 + band.stop  # window rows
                both = enlarge_rows(columns, s, slice(top, bottom))
                rows = slice(max(top, dy) - dy, bottom - dy)  # crop rows
                self._band(both[:, :, dy + rows.start - top :], fine[i : i + 1, :, rows],
                           coarse[i : i + 1, :, rows], weights[i : i + 1, :, rows], total[i : i + 1, rows])
        return weights, total

    def fused_from_cells(self, fine_cells: Tensor, coarse_cells: Tensor, fine: Tensor, coarse: Tensor,
                         offsets: list[tuple[int, int]], with_weights: bool) -> FusedStep:
        """``weights_from_cells`` and, from them, the refine step's per-pixel scores and
        labels, in one compiled pass on a CPU (``magseg.engine.fused.refine_pass``; the
        arguments are ``weights_from_cells``'s). The weights and their sum only with
        ``with_weights`` (a stage that keeps probabilities)."""
        gate = None if self.gate is None else self.gate.coefficients()
        return refine_pass(self._small(fine_cells, coarse_cells), fine, coarse, offsets, self.context_stride,
                           gate, with_weights)

    def _small(self, small_fine: Tensor, small_coarse: Tensor) -> Tensor:
        """What inference enlarges, from the pooled maps: the correction at 1/stride,
        shifted to a per-pixel maximum of 0 (``weights``), and after it the pooled fine map
        when there is a gate (its detail cue needs it at full size): ``(B, C or 2C, h, w)``."""
        delta = self._convolved(refiner_input(small_fine, small_coarse))
        delta = delta - delta.amax(dim=1, keepdim=True)  # exp never overflows (see weights)
        return delta if self.gate is None else torch.cat([delta, small_fine], dim=1)

    def _convolved(self, cells: Tensor) -> Tensor:
        """The convolutions on ``cells`` ``(B, 2C, h, w)``: the correction ``(B, C, h, w)``,
        float32, contiguous.

        Inference on a CPU, and anything under an autocast (the engine's ``bf16``), runs
        them on a channels-last copy of their input: oneDNN's kernels want NHWC, in float32
        (a quarter less time than from NCHW on an AVX2 CPU) and more so in bf16
        (docs/performance.md#the-refiners-convolutions). The correction comes back as
        float32: everything after it stays float32. Training keeps NCHW. With
        ``int8_convolutions`` set, inference on a CPU runs that instead."""
        if self.int8_convolutions is not None and cells.device.type == "cpu" and not torch.is_grad_enabled():
            return self.int8_convolutions(cells)
        if torch.is_autocast_enabled(cells.device.type) or (
                cells.device.type == "cpu" and not torch.is_grad_enabled()):
            cells = cells.contiguous(memory_format=torch.channels_last)
        return self.context(cells).float().contiguous()

    def _band(self, both: Tensor, fine: Tensor, coarse: Tensor, out: Tensor, total: Tensor | None) -> None:
        """The per-pixel part of ``weights`` on a band: ``both``, the band of ``_small``
        enlarged, into ``out`` (and its sum over the channels into ``total``)."""
        if self.gate is None:
            out.copy_(both)
        else:  # from_maps overwrites the enlarged fine map, the band's scratch
            gate = self.gate.from_maps(fine, coarse, both[:, self.classes :])
            torch.mul(both[:, : self.classes], gate, out=out)
        out.exp_().mul_(fine)
        if total is not None:
            torch.sum(out, dim=1, out=total)

    def probs(self, fine: Tensor, coarse: Tensor) -> Tensor:
        """Refined probabilities (for inference): ``softmax(forward(fine, coarse))``, computed
        as ``fine * e / (sum(fine * e) / sum(fine))`` with ``e = exp(gate * delta)``
        (``weights``), without the full-resolution log and softmax passes (equal up to the
        log floor: a 0 stays 0 instead of ~1e-6). While the correction is zero, ``e`` is
        exactly 1 and the denominator exactly 1, so the result is ``fine`` bit for bit."""
        weighted = self.weights(fine, coarse)
        norm = weighted.sum(dim=1, keepdim=True).div_(fine.sum(dim=1, keepdim=True).clamp_min_(1e-30))
        return weighted.div_(norm.clamp_min_(1e-30))

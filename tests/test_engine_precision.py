"""The engine's result at a reduced precision against fp32, on the fitted test model: the
backbone runs in bf16 or fp16, everything after it as the engine does at that precision.

Two kinds of claim, each one that holds whatever float kernels the CPU has (native bf16,
AVX512, or bf16 emulated on an AVX2-only CPU, whose rounding differs):

- end to end, the final labels agree with the fp32 run almost everywhere, and every crop
  picks exactly K pixels;
- stage by stage, from the same coarse map, the pixels picked at the reduced precision differ
  from fp32's only where the fp32 error map is within reach of the crop's K-th level: as far
  as the measured difference of the refined probabilities can move a level, no further.

The picked sets are not compared end to end: the top K of a quantised, blurred score is
discontinuous, and a one-level change at one stage moves the next stage's coarse map, so
their overlap measures the CPU's rounding, not the engine.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from geotiff import smooth_image

from magseg.engine import stages
from magseg.engine.certainty import error_score, median_blur
from magseg.engine.precision import precision_context
from magseg.engine.pyramid import owned_mask
from magseg.engine.refine_step import num_points, picked_pixels
from magseg.segmenter import Segmenter

# Odd sizes, so that crops overlap and reach past the image at every stage.
SIZES = [(64, 64), (90, 130), (150, 170)]


def _segmenter(checkpoint, precision):
    segmenter = Segmenter.from_checkpoint(checkpoint, [f"engine.precision={precision}"])
    # A refiner that does something (the fitted checkpoint's is untrained, its correction
    # zero), so that its arithmetic at the reduced precision is part of what is compared.
    torch.manual_seed(1)
    torch.nn.init.normal_(segmenter.refiner.context[-1].weight, std=0.5)
    return segmenter


def _images():
    return [smooth_image(3, h, w, seed=10 + s) for s, (h, w) in enumerate(SIZES)]


def _runs(checkpoint, precision):
    segmenter = _segmenter(checkpoint, precision)
    return [segmenter.segment(segmenter.normalize(i), return_stages=True) for i in _images()]


@pytest.fixture(scope="module")
def fp32_runs(fitted_checkpoint):
    return _runs(fitted_checkpoint, "fp32")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_labels_agree_with_fp32_and_k_is_exact(fitted_checkpoint, fp32_runs, precision):
    runs = _runs(fitted_checkpoint, precision)
    agree = total = 0
    for run, reference in zip(runs, fp32_runs):
        assert run.labels.dtype == torch.uint8 and run.labels.shape == reference.labels.shape
        agree += int((run.labels == reference.labels).sum())
        total += reference.labels.numel()
        assert len(run.stages) == len(reference.stages) == 3
        for stage, ref in zip(run.stages[1:], reference.stages[1:]):
            # The same number of pixels picked (K does not depend on precision).
            assert int(stage.refined.sum()) == int(ref.refined.sum()) > 0
    # Labels differ only where two classes are within the precision's reach of a tie.
    assert agree / total >= 0.995, (precision, agree, total)


def _swaps_far_from_threshold(coarse, fine32, fine_low, boxes, refine):
    """Check one batch of crops, refined from the same coarse map at fp32 and at the
    reduced precision; return (swapped pixels, the reach allowed, the largest swap distance).

    If the refined probabilities differ by at most eps, the error score by at most 2 eps
    (top-1 and top-2 move by eps each; the coarse factor is shared and at most 1), an 8-bit
    level by at most floor(255 * 2 eps) + 1, and so does its median (1-Lipschitz), and so
    does the K-th highest level of a crop (order statistics are 1-Lipschitz). A pixel picked
    by one run and not the other therefore lies within twice that of the fp32 K-th level.
    """
    picked32 = picked_pixels(coarse, fine32, boxes, refine)
    picked_low = picked_pixels(coarse, fine_low, boxes, refine)
    assert torch.equal(picked32.sum(dim=(1, 2)), picked_low.sum(dim=(1, 2)))
    eps = float((fine_low - fine32).abs().max())
    reach = 2 * (math.floor(255 * 2 * eps) + 1)
    levels = median_blur(error_score(fine32, coarse), refine.kernel) * 255
    owned = owned_mask(list(boxes), tuple(coarse.shape[-2:]))
    swapped, farthest = 0, 0.0
    for b, box in enumerate(boxes):
        k = num_points(refine.points, box.owned.height * box.owned.width)
        threshold = levels[b][owned[b]].topk(k).values[-1]
        differ = picked32[b] ^ picked_low[b]
        swapped += int(differ.sum())
        if differ.any():
            farthest = max(farthest, float((levels[b][differ] - threshold).abs().max()))
    return swapped, reach, farthest, eps


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_picked_pixels_move_only_within_the_precision_reach(fitted_checkpoint, precision, monkeypatch):
    segmenter = _segmenter(fitted_checkpoint, "fp32")
    checked = []
    refined_batch = stages.StageRun.refined_batch

    def checking(self, image, y, size, boxes, out, picked_map=None, store=None):
        # The crops' own answers and the refiner's convolutions at both precisions, as
        # refined_batch runs them (the blend mixes the answers alike).
        low = dataclasses.replace(self, engine=dataclasses.replace(self.engine, precision=precision))
        coarse = self.coarse(y, size, boxes)
        fine32 = stages.refine_probs(self.refiner, self.fine(image, size, boxes), coarse)
        with precision_context(self.engine.device, precision):
            fine_low = stages.refine_probs(self.refiner, low.fine(image, size, boxes), coarse)
        checked.append(_swaps_far_from_threshold(coarse, fine32, fine_low, boxes, self.refine))
        refined_batch(self, image, y, size, boxes, out, picked_map, store)

    monkeypatch.setattr(stages.StageRun, "refined_batch", checking)
    for image in _images():
        segmenter.segment(segmenter.normalize(image))
    assert checked
    swapped = sum(c[0] for c in checked)
    assert swapped > 0 or precision == "fp16"  # bf16 moves some picks: the check is not idle
    for _, reach, farthest, eps in checked:
        # The reduced precision is a few bits, not a different model: the bound stays narrow.
        assert eps < 0.1, (precision, eps)
        assert farthest <= reach, (precision, farthest, reach, eps)


def test_fp32_is_reproducible_bit_for_bit(fitted_checkpoint, fp32_runs):
    for run, reference in zip(_runs(fitted_checkpoint, "fp32"), fp32_runs):
        assert torch.equal(run.labels, reference.labels)
        for stage, ref in zip(run.stages[1:], reference.stages[1:]):
            assert torch.equal(stage.refined, ref.refined)


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_the_refiners_convolutions_run_at_the_engines_precision(fitted_checkpoint, precision, dtype, refine_path):
    # On either path (the fused pass or ATen's), every batch's refiner convolutions run in
    # the engine's precision.
    segmenter = _segmenter(fitted_checkpoint, precision)
    seen = []
    segmenter.refiner.context[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    image = segmenter.normalize(_images()[2])
    segmenter.segment(image)
    assert seen and set(seen) == {dtype}

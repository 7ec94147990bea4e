"""The engine's result at a reduced precision against fp32, on the fitted test model: the
backbone runs in bf16 or fp16, everything after it as the engine does at that precision, and
the final labels and the pixels each stage picked for refinement must still agree with the
fp32 run almost everywhere."""

from __future__ import annotations

import pytest
import torch
from geotiff import smooth_image

from magseg.segmenter import Segmenter

# Odd sizes, so that crops overlap and reach past the image at every stage.
SIZES = [(64, 64), (90, 130), (150, 170)]


def _runs(checkpoint, precision):
    segmenter = Segmenter.from_checkpoint(checkpoint, [f"engine.precision={precision}"])
    # A refiner that does something (the fitted checkpoint's is untrained, its correction
    # zero), so that its arithmetic at the reduced precision is part of what is compared.
    torch.manual_seed(1)
    torch.nn.init.normal_(segmenter.refiner.context[-1].weight, std=0.5)
    images = [smooth_image(3, h, w, seed=10 + s) for s, (h, w) in enumerate(SIZES)]
    return [segmenter.segment(segmenter.normalize(i), return_stages=True) for i in images]


@pytest.fixture(scope="module")
def fp32_runs(fitted_checkpoint):
    return _runs(fitted_checkpoint, "fp32")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_labels_and_picked_pixels_agree_with_fp32(fitted_checkpoint, fp32_runs, precision):
    runs = _runs(fitted_checkpoint, precision)
    labels, picked = [0, 0], [0, 0]  # agreeing, total
    for run, reference in zip(runs, fp32_runs):
        assert run.labels.dtype == torch.uint8 and run.labels.shape == reference.labels.shape
        labels[0] += int((run.labels == reference.labels).sum())
        labels[1] += reference.labels.numel()
        assert len(run.stages) == len(reference.stages) == 3
        for stage, ref in zip(run.stages[1:], reference.stages[1:]):
            # The same number of pixels picked per crop (K does not depend on precision) ...
            assert int(stage.refined.sum()) == int(ref.refined.sum()) > 0
            # ... and almost all of them the same pixels.
            picked[0] += int((stage.refined == ref.refined).sum())
            picked[1] += ref.refined.numel()
    assert labels[0] / labels[1] >= 0.995, (precision, labels)
    assert picked[0] / picked[1] >= 0.995, (precision, picked)


def test_fp32_is_reproducible_bit_for_bit(fitted_checkpoint, fp32_runs):
    for run, reference in zip(_runs(fitted_checkpoint, "fp32"), fp32_runs):
        assert torch.equal(run.labels, reference.labels)
        for stage, ref in zip(run.stages[1:], reference.stages[1:]):
            assert torch.equal(stage.refined, ref.refined)

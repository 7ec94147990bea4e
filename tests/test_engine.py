"""The progressive engine: its two invariants, batch independence, adaptive selection.

Every run here is at fp32, whatever ``auto`` resolves to on this CPU: the invariants are
exact, and tests/test_precision.py covers the other precisions."""

import dataclasses

import pytest
import torch
from torch import nn

from magseg.config import AdaptiveConfig, EngineConfig, PyramidConfig, RefineConfig
from magseg.engine.certainty import error_map
from magseg.engine.pointrend_reference import pixel_centres, point_sample, scatter_points, top_k_points
from magseg.engine.pyramid import crop_boxes, extract_crops, owned_mask
from magseg.engine.refine_step import (
    crop_uncertainty,
    labels_of,
    num_points,
    refine_crops,
    refine_labels,
    select_crops,
)
from magseg.engine.refiner_network import Refiner
from magseg.engine.stages import segment


@pytest.fixture
def backbone(tiny_segmenter):
    return tiny_segmenter.backbone


@pytest.fixture
def pyramid(tiny_config):
    return tiny_config.pyramid  # 32 -> 64 -> 128, crop 32, input 32


# Odd, non-square, smaller and larger than the reference scene (128).
IMAGE_SIZES = [(128, 128), (100, 90), (77, 131), (20, 45), (150, 33)]
FP32 = EngineConfig(precision="fp32")


def _run(image, backbone, pyramid, **kw):
    kw.setdefault("engine", FP32)
    return segment(image, backbone, pyramid, return_probs=True, **kw)


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_k_zero_gives_the_stage0_prediction_upsampled(size, backbone, pyramid):
    image = torch.randn(3, *size)
    progressive = _run(image, backbone, pyramid, refine=RefineConfig(points=0), return_stages=True)
    coarse_only = _run(image, backbone, pyramid.downsample_only())
    assert torch.equal(progressive.probs, coarse_only.probs)
    assert torch.equal(progressive.labels, coarse_only.labels)
    # no stage after the first ran a crop or changed a pixel
    assert [s.crops_run for s in progressive.stages[1:]] == [0, 0]
    assert all(not s.refined.any() for s in progressive.stages[1:])


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_k_all_without_refiner_gives_the_finest_patch_only_prediction(size, backbone, pyramid):
    image = torch.randn(3, *size)
    progressive = _run(image, backbone, pyramid, refine=RefineConfig(points=1.0), refiner=None)
    patch_only = _run(image, backbone, pyramid.patch_only())
    assert torch.equal(progressive.probs, patch_only.probs)
    assert torch.equal(progressive.labels, patch_only.labels)


def test_k_all_with_an_untrained_refiner_is_the_patch_only_prediction(backbone, pyramid, tiny_config, refine_path):
    # The refiner's heads start at zero: refined = fine up to the log-probability floor.
    image = torch.randn(3, 100, 90)
    refiner = Refiner(tiny_config.num_classes, 8, 2).eval()
    progressive = _run(image, backbone, pyramid, refine=RefineConfig(points=1.0), refiner=refiner)
    patch_only = _run(image, backbone, pyramid.patch_only())
    assert torch.allclose(progressive.probs, patch_only.probs, atol=1e-5)


def test_progressive_differs_from_both_baselines_when_k_is_partial(backbone, pyramid):
    image = torch.randn(3, 128, 128)
    progressive = _run(image, backbone, pyramid, refine=RefineConfig(points=0.3, kernel=3))
    assert not torch.equal(progressive.probs, _run(image, backbone, pyramid.downsample_only()).probs)
    assert not torch.equal(progressive.probs, _run(image, backbone, pyramid.patch_only()).probs)


def _picks_exactly_k(backbone, pyramid, refiner=None):
    image = torch.randn(3, 128, 128)  # stage sizes 32, 64, 128: crops 32 tile exactly
    result = _run(image, backbone, pyramid, refiner=refiner, refine=RefineConfig(points=10, kernel=3),
                  return_stages=True)
    s1, s2 = result.stages[1], result.stages[2]
    assert (s1.crops_run, s2.crops_run) == (4, 16)
    assert s1.refined.sum() == 4 * 10 and s2.refined.sum() == 16 * 10
    # with a fraction: 25% of each 32x32 crop
    result = _run(image, backbone, pyramid, refiner=refiner, refine=RefineConfig(points=0.25, kernel=3),
                  return_stages=True)
    assert result.stages[2].refined.sum() == 16 * 256


def test_each_crop_refines_exactly_k_of_its_own_pixels(backbone, pyramid):
    _picks_exactly_k(backbone, pyramid)


def test_each_crop_refines_exactly_k_of_its_own_pixels_with_a_refiner(backbone, pyramid, tiny_config, refine_path):
    refiner = Refiner(tiny_config.num_classes, 8, 2).eval()
    torch.nn.init.normal_(refiner.context[-1].weight, std=0.5)
    _picks_exactly_k(backbone, pyramid, refiner)


def test_result_does_not_depend_on_batch_size(backbone, pyramid, tiny_config, refine_path):
    image = torch.randn(3, 100, 90)  # overlapping crops at every stage
    refiner = Refiner(tiny_config.num_classes, 8, 2).eval()
    torch.nn.init.normal_(refiner.context[-1].weight, std=0.5)  # a refiner that does something
    runs = [
        _run(image, backbone, pyramid, refiner=refiner, engine=dataclasses.replace(FP32, batch_size=b))
        for b in (1, 3, 16)
    ]
    for other in runs[1:]:
        assert torch.allclose(runs[0].probs, other.probs, atol=1e-6)
        assert torch.equal(runs[0].labels, other.labels)


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_labels_alone_equal_the_labels_of_the_probabilities(size, backbone, pyramid, tiny_config, refine_path):
    # Without return_probs the last stage writes labels crop by crop and never makes the
    # full-size probability map; the labels must be those of the map.
    image = torch.randn(3, *size, generator=torch.Generator().manual_seed(sum(size)))
    refiner = Refiner(tiny_config.num_classes, 8, 2).eval()
    torch.nn.init.normal_(refiner.context[-1].weight, std=0.5)
    for engine in (dataclasses.replace(FP32, batch_size=3),
                   dataclasses.replace(FP32, adaptive=AdaptiveConfig(max_crops=5))):
        kw = dict(refiner=refiner, refine=RefineConfig(points=0.4, kernel=3), engine=engine, return_stages=True)
        with_probs = _run(image, backbone, pyramid, **kw)
        labels_only = segment(image, backbone, pyramid, **kw)
        assert labels_only.probs is None
        assert torch.equal(labels_only.labels, with_probs.probs.argmax(0).to(torch.uint8))
        for a, b in zip(labels_only.stages, with_probs.stages):
            assert torch.equal(a.labels, b.labels) and a.crops_run == b.crops_run


@pytest.mark.parametrize("shape", [(2, 1, 1), (7, 5, 3), (3, 7, 4, 6), (1, 127, 2, 3), (200, 2, 2)])
def test_labels_of_is_the_first_maximum(shape):
    g = torch.Generator().manual_seed(len(shape) + shape[-3])
    # Values on a coarse grid, so that ties between classes are common.
    probs = torch.randint(0, 4, shape, generator=g).float() / 4
    probs[..., 0, 0] = 0.5  # a pixel where every class ties: id 0
    expected = probs.max(dim=-3).indices.to(torch.uint8)  # first maximum, by definition
    assert (probs == probs.amax(dim=-3, keepdim=True)).sum(dim=-3).gt(1).any()  # ties exist
    got = labels_of(probs)
    assert got.dtype == torch.uint8 and torch.equal(got, expected)
    assert (got[..., 0, 0] == 0).all()


def test_any_module_mapping_images_to_logits_is_a_backbone(pyramid):
    conv = nn.Conv2d(3, 4, kernel_size=1).eval()
    image = torch.randn(3, 70, 50)
    result = _run(image, conv, pyramid, refine=RefineConfig(points=0.5, kernel=3))
    assert result.labels.shape == (70, 50) and result.labels.dtype == torch.uint8
    assert result.probs.shape == (4, 70, 50)
    assert torch.allclose(result.probs.sum(0), torch.ones(70, 50), atol=1e-5)


def test_input_size_not_divisible_by_the_encoder_stride_is_padded(tiny_segmenter):
    pyramid = PyramidConfig(scales=[40, 80], crop=40, input=44)  # 44 is not a multiple of 32
    result = segment(torch.randn(3, 80, 80), tiny_segmenter.backbone, pyramid, engine=FP32)
    assert result.labels.shape == (80, 80)


def test_refine_crops_changes_only_owned_top_k_pixels():
    # One 4x4 crop that owns only its left half; coarse is unsure everywhere, refined is sure
    # on two pixels of the left half and on one of the right half.
    boxes = crop_boxes((4, 8), (4, 4))
    box = boxes[1]  # right crop: window cols 4..8 (owns all of them)
    coarse = torch.full((1, 2, 4, 4), 0.5)
    refined = torch.full((1, 2, 4, 4), 0.5)
    for y, x in [(0, 0), (3, 3), (1, 2)]:
        refined[0, :, y, x] = torch.tensor([1.0, 0.0])
    out = coarse.clone()
    picked = refine_crops(out, refined, [box], RefineConfig(points=3, kernel=1))
    assert picked.sum() == 3
    assert torch.equal(out[0, :, picked[0]], refined[0, :, picked[0]])
    assert torch.equal(out[0, :, ~picked[0]], coarse[0, :, ~picked[0]])
    assert picked[0, 0, 0] and picked[0, 3, 3] and picked[0, 1, 2]


@pytest.mark.parametrize("size, crop", [((8, 16), (8, 8)), ((9, 20), (9, 8)), ((6, 6), (8, 8))])
def test_refine_crops_equals_point_sample_and_scatter(size, crop):
    # The engine's batched refinement against PointRend's steps done crop by crop: top-K of
    # the error map over the owned pixels, point_sample of R at their centres, scatter into Y.
    # Crops that own every pixel, crops that overlap (the last one shifted) and a padded one.
    boxes = crop_boxes(size, crop)
    g = torch.Generator().manual_seed(size[1])
    coarse = torch.rand(len(boxes), 4, *crop, generator=g).softmax(1)
    refined = torch.rand(len(boxes), 4, *crop, generator=g).softmax(1)
    refine = RefineConfig(points=0.5, kernel=3)
    out = coarse.clone()
    picked = refine_crops(out, refined, boxes, refine)
    score = error_map(refined, coarse, refine.kernel)
    owned = owned_mask(boxes, crop)
    for i, box in enumerate(boxes):
        k = num_points(refine.points, box.owned.height * box.owned.width)
        index = top_k_points(score[i], k, owned[i])
        values = point_sample(refined[i : i + 1], pixel_centres(index, crop)[None])
        expected = scatter_points(coarse[i : i + 1], index[None], values)[0]
        assert torch.equal(out[i], expected)
        assert sorted(picked[i].flatten().nonzero().flatten().tolist()) == sorted(index.tolist())


@pytest.mark.parametrize("size, crop", [((8, 16), (8, 8)), ((9, 20), (9, 8)), ((6, 6), (8, 8))])
def test_refine_labels_are_the_labels_of_refine_crops(size, crop):
    # The last stage's shortcut (argmax of R where picked, of Y elsewhere) against the argmax
    # of the refined probabilities; coarse values make ties between classes frequent.
    boxes = crop_boxes(size, crop)
    g = torch.Generator().manual_seed(size[0])
    coarse = (torch.rand(len(boxes), 5, *crop, generator=g) * 4).round().softmax(1)
    refined = (torch.rand(len(boxes), 5, *crop, generator=g) * 4).round().softmax(1)
    refine = RefineConfig(points=0.4, kernel=3)
    labels, picked = refine_labels(coarse, refined, boxes, refine)
    out = coarse.clone()
    expected_picked = refine_crops(out, refined, boxes, refine)
    assert torch.equal(picked, expected_picked)
    assert labels.dtype == torch.uint8 and torch.equal(labels, labels_of(out))
    assert not torch.equal(labels, labels_of(coarse))  # the refinement did change labels


@pytest.mark.parametrize("size, crop", [((8, 16), (8, 8)), ((9, 20), (9, 8)), ((6, 6), (8, 8))])
def test_the_refine_step_from_weights_equals_it_from_probabilities(size, crop):
    # The engine hands the refine step R up to a per-pixel factor (Refiner.weights) and their
    # sum: the same picks and labels as from R itself, and refine_crops writes R.
    boxes = crop_boxes(size, crop)
    g = torch.Generator().manual_seed(size[1] + crop[0])
    coarse = (torch.rand(len(boxes), 5, *crop, generator=g) * 4).round().softmax(1)
    refined = (torch.rand(len(boxes), 5, *crop, generator=g) * 4).round().softmax(1)
    scale = torch.rand(len(boxes), 1, *crop, generator=g) * 3 + 0.5  # a positive factor per pixel
    weights = refined * scale
    total = weights.sum(1)
    refine = RefineConfig(points=0.4, kernel=3)
    labels, picked = refine_labels(coarse, weights, boxes, refine, total=total)
    expected_labels, expected_picked = refine_labels(coarse, refined, boxes, refine)
    # Picks agree but where two error scores tie within float rounding at the K-th place.
    assert (picked != expected_picked).sum() <= 2 * len(boxes)
    assert torch.equal(picked.flatten(1).sum(1), expected_picked.flatten(1).sum(1))  # exact K
    assert torch.equal(labels[picked], labels_of(refined)[picked])
    assert torch.equal(labels[~picked], labels_of(coarse)[~picked])
    out = coarse.clone()
    assert torch.equal(refine_crops(out, weights.clone(), boxes, refine, total=total), picked)
    assert torch.allclose(out, torch.where(picked[:, None], refined, coarse), atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 1, 1), (7, 5, 3), (3, 7, 4, 6)])
def test_labels_of_takes_the_maximum_it_is_given(shape):
    g = torch.Generator().manual_seed(shape[-1])
    probs = torch.randint(0, 4, shape, generator=g).float() / 4  # frequent ties
    assert torch.equal(labels_of(probs, probs.amax(dim=-3)), labels_of(probs))
    assert torch.equal(labels_of(probs, probs.amax(dim=-3)), probs.max(dim=-3).indices.to(torch.uint8))


def test_select_crops_keeps_the_most_uncertain_first():
    # 2 classes on a 4x8 image tiled by 4x4 crops; left crop certain, right crop unsure.
    coarse = torch.zeros(2, 4, 8)
    coarse[0, :, :4], coarse[1, :, :4] = 0.9, 0.1  # certainty 0.8 -> uncertainty 0.2
    coarse[0, :, 4:], coarse[1, :, 4:] = 0.6, 0.4  # certainty 0.2 -> uncertainty 0.8
    boxes = crop_boxes((4, 8), (4, 4))
    scores = crop_uncertainty(extract_crops(coarse, boxes, (4, 4)), boxes)
    assert scores == pytest.approx([0.2, 0.8])
    assert select_crops(scores, boxes, AdaptiveConfig()) == boxes
    assert select_crops(scores, boxes, AdaptiveConfig(max_crops=1)) == [boxes[1]]
    assert select_crops(scores, boxes, AdaptiveConfig(threshold=0.5)) == [boxes[1]]
    assert select_crops(scores, boxes, AdaptiveConfig(threshold=0.1)) == boxes
    assert select_crops(scores, boxes, AdaptiveConfig(threshold=0.9)) == []


def test_crop_uncertainty_counts_only_owned_pixels():
    # A 4x6 image tiled by 4x4 crops: the crops overlap on columns 2-3, split at the middle,
    # so the right crop owns columns 3-5 only (its first column belongs to the left crop).
    boxes = crop_boxes((4, 6), (4, 4))
    coarse = torch.zeros(2, 4, 6)
    coarse[0], coarse[1] = 1.0, 0.0  # certain everywhere (uncertainty 0) ...
    coarse[:, :, 2] = 0.5  # ... except column 2 (uncertainty 1), owned by the left crop
    scores = crop_uncertainty(extract_crops(coarse, boxes, (4, 4)), boxes)
    assert scores == pytest.approx([1 / 3, 0.0])


def test_adaptive_mode_runs_fewer_crops(backbone, pyramid):
    image = torch.randn(3, 128, 128)
    full = _run(image, backbone, pyramid, return_stages=True)
    fast = _run(image, backbone, pyramid, return_stages=True,
                engine=dataclasses.replace(FP32, adaptive=AdaptiveConfig(max_crops=2)))
    assert [s.crops_run for s in full.stages] == [1, 4, 16]
    assert [s.crops_run for s in fast.stages] == [1, 2, 2]
    assert fast.labels.shape == full.labels.shape


def test_skipped_last_stage_crops_keep_the_coarse_result_exactly(backbone):
    # What scripts/adaptive_oracle.py relies on: running a subset of the last stage's crops
    # gives the full result on those crops and the result without that stage elsewhere.
    two = PyramidConfig(scales=((32, 32), (64, 64)), crop=(32, 32), input=(32, 32))
    coarse_only = PyramidConfig(scales=((32, 32),), crop=(32, 32), input=(32, 32), scene=(64, 64))
    image = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(3))
    full = _run(image, backbone, two)
    skip = _run(image, backbone, coarse_only)
    adaptive = AdaptiveConfig(max_crops=2)
    fast = _run(image, backbone, two, engine=dataclasses.replace(FP32, adaptive=adaptive))
    boxes = crop_boxes((64, 64), (32, 32))
    chosen = select_crops(crop_uncertainty(extract_crops(skip.probs, boxes, (32, 32)), boxes), boxes, adaptive)
    assert len(chosen) == 2
    for box in boxes:
        expected = full if box in chosen else skip
        assert torch.equal(fast.labels[box.owned.slices], expected.labels[box.owned.slices])
    assert not torch.equal(full.labels, skip.labels)


def test_image_must_be_chw(backbone, pyramid):
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        segment(torch.randn(1, 3, 32, 32), backbone, pyramid)


class Probabilities(nn.Module):
    """Another backbone's softmax, as a runtime's graph that ends in it returns it."""

    returns_probabilities = True

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return (out[0] if isinstance(out, (tuple, list)) else out).softmax(dim=1)


@pytest.mark.parametrize("size", [(128, 128), (77, 131)])
def test_a_backbone_of_probabilities_is_taken_as_it_is(size, backbone, pyramid, tiny_config, refine_path):
    # The engine must not apply a second softmax: a backbone that gives probabilities (the
    # same numbers, the softmax done inside it) gives the logits backbone's result.
    torch.manual_seed(4)
    image = torch.randn(3, *size)
    refiner = Refiner(tiny_config.num_classes, 8, 2).eval()
    torch.nn.init.normal_(refiner.context[-1].weight, std=0.5)
    kw = dict(refine=RefineConfig(points=0.5, kernel=3), refiner=refiner)
    logits = _run(image, backbone, pyramid, **kw)
    probs = _run(image, Probabilities(backbone), pyramid, **kw)
    assert (probs.probs - logits.probs).abs().max().item() < 1e-5
    assert (probs.labels == logits.labels).float().mean().item() >= 0.999

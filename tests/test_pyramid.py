"""Pyramid geometry: crops cover every pixel of any size; stitching gives the tensor back."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from magseg.engine.pyramid import (
    crop_boxes,
    extract_crops,
    owned_mask,
    resize,
    stage_sizes,
    stitch_crops,
)

sizes = st.tuples(st.integers(1, 300), st.integers(1, 300))
# Crops of at least 3 px: a 1 px crop on a 300 px image is 90,000 boxes and adds nothing.
crops = st.tuples(st.integers(3, 96), st.integers(3, 96))


@settings(max_examples=200, deadline=None)
@given(size=sizes, crop=crops)
def test_crops_cover_every_pixel_and_owned_regions_partition_the_image(size, crop):
    boxes = crop_boxes(size, crop)
    covered = torch.zeros(size, dtype=torch.int32)
    owned = torch.zeros(size, dtype=torch.int32)
    for b in boxes:
        w, o = b.window, b.owned
        assert 0 <= w.top and w.top + w.height <= size[0] and 0 <= w.left and w.left + w.width <= size[1]
        assert w.height == min(crop[0], size[0]) and w.width == min(crop[1], size[1])
        # the owned region lies inside the window
        assert w.top <= o.top and o.top + o.height <= w.top + w.height
        assert w.left <= o.left and o.left + o.width <= w.left + w.width
        covered[w.slices] += 1
        owned[o.slices] += 1
    assert covered.min() >= 1
    assert torch.all(owned == 1)


@settings(max_examples=100, deadline=None)
@given(size=sizes, crop=crops)
def test_crops_overlap_only_when_size_is_not_a_multiple(size, crop):
    boxes = crop_boxes(size, crop)
    covered = torch.zeros(size, dtype=torch.int32)
    for b in boxes:
        covered[b.window.slices] += 1
    if size[0] % crop[0] == 0 and size[1] % crop[1] == 0:
        assert torch.all(covered == 1)
    # the last crop of a row/column is flush with the far edge
    assert max(b.window.top + b.window.height for b in boxes) == size[0]
    assert max(b.window.left + b.window.width for b in boxes) == size[1]


@settings(max_examples=100, deadline=None)
@given(size=sizes, crop=crops, channels=st.integers(1, 3))
def test_stitching_crops_of_a_known_tensor_gives_it_back(size, crop, channels):
    image = torch.arange(channels * size[0] * size[1], dtype=torch.float32).view(channels, *size)
    boxes = crop_boxes(size, crop)
    cut = extract_crops(image, boxes, crop)
    assert cut.shape == (len(boxes), channels, *crop)
    out = stitch_crops(torch.full_like(image, -1), cut, boxes)
    assert torch.equal(out, image)


def test_small_image_crop_is_zero_padded_and_owns_only_real_pixels():
    boxes = crop_boxes((5, 3), (8, 8))
    assert len(boxes) == 1
    cut = extract_crops(torch.ones(1, 5, 3), boxes, (8, 8))
    assert cut.sum() == 15 and cut[0, 0, :5, :3].sum() == 15
    mask = owned_mask(boxes, (8, 8))
    assert mask.sum() == 15 and mask[0, :5, :3].all()


def test_overlap_is_split_at_its_middle_by_hand():
    # length 10, crop 4: starts 0, 4, 6; crops 2 and 3 overlap on [6, 8) -> split at 7
    boxes = crop_boxes((1, 10), (1, 4))
    assert [(b.window.left, b.owned.left, b.owned.left + b.owned.width) for b in boxes] == [
        (0, 0, 4), (4, 4, 7), (6, 7, 10)]


def test_stage_sizes_keep_magnification_for_any_image():
    scales = ((612, 612), (1224, 1224), (2448, 2448))
    assert stage_sizes(scales, (2448, 2448)) == list(scales)
    assert stage_sizes(scales, (1224, 2448)) == [(306, 612), (612, 1224), (1224, 2448)]
    assert stage_sizes(scales, (3, 5)) == [(1, 1), (2, 2), (3, 5)]


def test_resize_is_identity_at_same_size_and_antialiased_when_shrinking():
    x = torch.rand(2, 3, 8, 8)
    assert resize(x, (8, 8)) is x
    # A one-pixel impulse falls between the sample points of a plain 4x bilinear shrink
    # (which samples at 1.5 and 5.5) and vanishes; the antialiased shrink keeps its mass.
    impulse = torch.zeros(1, 1, 8, 8)
    impulse[..., 3, 3] = 1
    plain = torch.nn.functional.interpolate(impulse, size=(2, 2), mode="bilinear", align_corners=False)
    assert plain.max() == 0
    shrunk = resize(impulse, (2, 2))
    assert shrunk.max() > 0
    assert shrunk.argmax().item() == 0  # strongest in the output pixel covering input 0..3


def test_crop_boxes_rejects_empty_images():
    with pytest.raises(ValueError):
        crop_boxes((0, 5), (4, 4))



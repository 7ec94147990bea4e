"""Pyramid geometry: crops cover every pixel of any size; stitching gives the tensor back."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from magseg.engine.pyramid import (
    crop_boxes,
    crop_windows,
    extract_crops,
    extract_windows,
    owned_mask,
    resize,
    resized_windows,
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
        assert 0 <= b.top and b.top + b.height <= size[0] and 0 <= b.left and b.left + b.width <= size[1]
        assert b.height == min(crop[0], size[0]) and b.width == min(crop[1], size[1])
        # the owned region lies inside the window
        assert b.top <= b.own_top and b.own_top + b.own_height <= b.top + b.height
        assert b.left <= b.own_left and b.own_left + b.own_width <= b.left + b.width
        covered[b.window] += 1
        owned[b.owned] += 1
    assert covered.min() >= 1
    assert torch.all(owned == 1)


@settings(max_examples=100, deadline=None)
@given(size=sizes, crop=crops)
def test_crops_overlap_only_when_size_is_not_a_multiple(size, crop):
    boxes = crop_boxes(size, crop)
    covered = torch.zeros(size, dtype=torch.int32)
    for b in boxes:
        covered[b.window] += 1
    if size[0] % crop[0] == 0 and size[1] % crop[1] == 0:
        assert torch.all(covered == 1)
    # the last crop of a row/column is flush with the far edge
    assert max(b.top + b.height for b in boxes) == size[0]
    assert max(b.left + b.width for b in boxes) == size[1]


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
    assert [(b.left, b.own_left, b.own_left + b.own_width) for b in boxes] == [(0, 0, 4), (4, 4, 7), (6, 7, 10)]


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


@settings(max_examples=300, deadline=None)
@given(
    cells=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    tiles=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    factors=st.tuples(st.sampled_from([1, 2, 4, 8, 3]), st.sampled_from([1, 2, 4, 8, 3])),
    jitter=st.tuples(st.sampled_from([0, 0, 0, 0, -1, 5]), st.sampled_from([0, 0, 0, 0, -1, 5])),
    channels=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_resized_windows_equal_cutting_the_resized_map_bit_for_bit(cells, tiles, factors, jitter, channels, seed):
    # The engine's crop-by-crop upsampling: exact for power-of-two factors and windows on
    # multiples of them (the fast path: a map tiled exactly, jitter 0), and the same answer
    # the long way otherwise (factor 1 or 3, windows off the grid or past the border, small
    # windows).
    source = (cells[0] * tiles[0], cells[1] * tiles[1])
    x = torch.rand(channels, *source, generator=torch.Generator().manual_seed(seed))
    size = (source[0] * factors[0], source[1] * factors[1])
    crop = (max(1, size[0] // tiles[0] + jitter[0]), max(1, size[1] // tiles[1] + jitter[1]))
    windows = crop_windows(crop_boxes(size, crop), crop)
    expected = extract_windows(resize(x, size), windows)
    assert torch.equal(resized_windows(x, size, windows), expected)


@pytest.mark.parametrize("source, factor, crop", [((1, 32), 4, 4), ((2, 16), 8, 8), ((5, 32), 4, 16)])
def test_resized_windows_small_windows_of_a_large_map_are_exact(source, factor, crop):
    # These once differed by 1 ulp: PyTorch upsamples outputs of height + width <= 128 with
    # another kernel than larger ones, so pieces that small must not be upsampled apart.
    x = torch.rand(2, *source, generator=torch.Generator().manual_seed(0))
    size = (source[0] * factor, source[1] * factor)
    windows = crop_windows(crop_boxes(size, (crop, crop)), (crop, crop))
    assert torch.equal(resized_windows(x, size, windows), extract_windows(resize(x, size), windows))


def test_resized_windows_fast_path_at_engine_sizes(monkeypatch):
    # 306 -> 612 with crops of 154 (even offsets: the fast path, checked by making the whole-map
    # resize unavailable to it) and of 153 (odd offsets: the long way).
    import magseg.engine.pyramid as pyramid

    x = torch.rand(7, 306, 306, generator=torch.Generator().manual_seed(0))
    expected = {c: extract_windows(resize(x, (612, 612)), crop_windows(crop_boxes((612, 612), (c, c)), (c, c)))
                for c in (153, 154)}
    long_way = pyramid.resize
    monkeypatch.setattr(pyramid, "resize", lambda *a, **k: pytest.fail("whole map resized"))
    windows = crop_windows(crop_boxes((612, 612), (154, 154)), (154, 154))
    assert torch.equal(resized_windows(x, (612, 612), windows), expected[154])
    monkeypatch.setattr(pyramid, "resize", long_way)
    windows = crop_windows(crop_boxes((612, 612), (153, 153)), (153, 153))
    assert torch.equal(resized_windows(x, (612, 612), windows), expected[153])

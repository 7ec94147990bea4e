"""Crop outputs blended over their margins (magseg.engine.blend): the ramps by hand and as
properties over many axes (a partition of unity, inside the windows, with context), the
blended views by hand, memory = disk bit for bit, and a map whose crop grid disappears."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from magseg.config import EngineConfig, PyramidConfig
from magseg.engine.blend import AxisRamp, BlendGrid, FineStore, axis_ramps, blends
from magseg.engine.pyramid import CropBox, crop_boxes, grown_windows
from magseg.engine.maps import MemoryMap
from magseg.engine.resample import TensorSource, pool_cells
from magseg.engine.stages import MemorySink, StageRun, run_job, run_stages, segment

FP32 = EngineConfig(precision="fp32")


def test_ramps_by_hand():
    # 32 px in crops of 16 with a margin of 4: one border at 16, ramped over [14, 18).
    first, second = axis_ramps(32, 16, 4)
    assert (first, second) == (AxisRamp(0, 16, 0, 2), AxisRamp(16, 32, 2, 0))
    torch.testing.assert_close(first.weights(12, 20), torch.tensor([1, 1, 0.875, 0.625, 0.375, 0.125, 0, 0]))
    torch.testing.assert_close(second.weights(12, 20), torch.tensor([0, 0, 0.125, 0.375, 0.625, 0.875, 1, 1]))
    # No margin, or one crop: hard edges, nothing blends.
    assert [r.r_hi for r in axis_ramps(32, 16, 0)] == [0, 0] and not blends((32, 32), (16, 16), (0, 0))
    assert axis_ramps(16, 16, 4) == [AxisRamp(0, 16, 0, 0)] and not blends((16, 10), (16, 16), (4, 4))
    assert blends((32, 10), (16, 16), (4, 4))


@pytest.mark.parametrize("seed", range(40))
def test_ramps_are_a_partition_of_unity_inside_the_windows_with_context(seed):
    rng = np.random.default_rng(seed)
    crop = int(rng.integers(4, 40))
    length = int(rng.integers(1, 6 * crop))
    margin = int(rng.integers(0, crop))
    ramps = axis_ramps(length, crop, margin)
    boxes = crop_boxes((1, length), (1, crop))
    windows, _, _ = grown_windows(boxes, (1, crop), (1, length), (0, margin))
    total, count = torch.zeros(length), torch.zeros(length)
    for ramp, window in zip(ramps, windows):
        a, b = ramp.support
        assert ramp.r_lo <= margin // 2 and ramp.r_hi <= margin // 2
        if length > crop:  # every weighted answer has r pixels of context in its window
            assert window.left + ramp.r_lo <= a + 2 * ramp.r_lo and b - ramp.r_hi + 2 * ramp.r_hi <= window.right
            assert window.left <= a - ramp.r_lo or a == 0
        assert 0 <= a and b <= length
        w = ramp.weights(a, b)
        assert bool((w > 0).all()) and bool((w <= 1).all())
        total[a:b] += w
        count[a:b] += 1
    torch.testing.assert_close(total, torch.ones(length), atol=1e-6, rtol=0)
    assert int(count.max()) <= 2


def _stored(store: FineStore, boxes: list[CropBox], values: list[float]) -> None:
    """Crop i answers ``values[i]`` (class 0) and ``1 - values[i]`` (class 1) everywhere."""
    (eh, ew) = store.extent
    for box, v in zip(boxes, values):
        store.write([box], torch.tensor([v, 1 - v]).view(1, 2, 1, 1).expand(1, 2, eh, ew).contiguous())


@pytest.mark.parametrize("on_disk", [False, True])
def test_blended_views_by_hand(tmp_path, on_disk):
    # A 32 x 16 stage, crops of 16, margin 4: two crops one above the other answering 0 and 1.
    store = FineStore((32, 16), (16, 16), (4, 4), tmp_path / "fine" if on_disk else None)
    boxes = crop_boxes((32, 16), (16, 16))
    _stored(store, boxes, [0.0, 1.0])
    top, bottom = store.crops(boxes)
    ramp = torch.tensor([0.125, 0.375])  # the lower crop's weight at rows 14, 15
    torch.testing.assert_close(top[0, 14:16, 0], ramp)
    assert torch.equal(top[0, :14], torch.zeros(14, 16))  # its core: its own answer, exactly
    torch.testing.assert_close(bottom[0, 0:2, 0], torch.tensor([0.625, 0.875]))
    assert torch.equal(bottom[0, 2:], torch.ones(14, 16))
    torch.testing.assert_close(top.sum(0), torch.ones(16, 16))  # still a distribution
    # The grown window view: the same values where the crop views cover it.
    grown, _, _ = grown_windows(boxes[:1], (16, 16), (32, 16), (4, 4))
    view = store.views(boxes[:1], grown)[0]
    assert view.shape == (2, 24, 16) and torch.equal(view[:, :16], top)
    # A neighbour that did not run (adaptive mode) leaves the crop its own answer.
    alone = FineStore((32, 16), (16, 16), (4, 4))
    _stored(alone, boxes[:1], [0.0])
    assert torch.equal(alone.crops(boxes[:1])[0, 0], torch.zeros(16, 16))
    store.discard()


def test_memory_and_disk_stores_agree_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    size, crop, margin = (70, 53), (16, 16), (6, 6)
    boxes = crop_boxes(size, crop)
    memory, disk = FineStore(size, crop, margin), FineStore(size, crop, margin, tmp_path / "f")
    windows = torch.rand(len(boxes), 3, *memory.extent)
    for store in (memory, disk):
        store.write(boxes[::2], windows[::2])  # any order, any batches
        store.write(boxes[1::2], windows[1::2])
    assert torch.equal(memory.crops(boxes), disk.crops(boxes))
    assert disk.disk_bytes() > 0
    disk.discard()
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("on_disk", [False, True])
@pytest.mark.parametrize("stride", [3, 4, 8])
@pytest.mark.parametrize("compiled", [False, True])
def test_crops_and_cells_are_the_crop_views_and_the_pooled_window_views(tmp_path, on_disk, stride, compiled):
    # Random answers on a 70 x 53 stage, crops of 16, margin 6 (windows 28 x 28, ragged at
    # the far edges, crops off the cell grid), one crop skipped (adaptive mode): the crop
    # views exactly, and the cells of the window views made without them, up to rounding.
    torch.manual_seed(stride)
    size, crop, margin = (70, 53), (16, 16), (6, 6)
    boxes = crop_boxes(size, crop)
    store = FineStore(size, crop, margin, tmp_path / "f" if on_disk else None)
    ran = [b for i, b in enumerate(boxes) if i != 6]
    store.write(ran, torch.rand(len(ran), 3, *store.extent))
    asked = ran[2:9]
    if compiled:
        pytest.importorskip("numba", reason="the compiled pass needs numba")
    crops, cells = store.crops_and_cells(asked, stride, compiled)
    assert torch.equal(crops, store.crops(asked))
    grown, _, _ = grown_windows(asked, crop, size, margin)
    expected = pool_cells(store.views(asked, grown), stride)
    assert cells.shape == expected.shape
    torch.testing.assert_close(cells, expected, rtol=1e-6, atol=1e-6)
    assert (expected - pool_cells(torch.stack([store._read(store.grid.index[b], slice(None), slice(None))
                                               for b in asked]), stride)).abs().max() > 1e-3  # blended


def test_sources_are_the_crops_whose_answers_a_view_reads():
    size, crop, margin = (64, 64), (16, 16), (4, 4)
    boxes = crop_boxes(size, crop)  # 4 x 4
    assert BlendGrid(size, crop, margin).sources([boxes[5]]) == [boxes[i] for i in (0, 1, 2, 4, 5, 6, 8, 9, 10)]
    assert BlendGrid(size, crop, (0, 0)).sources([boxes[5]]) == [boxes[5]]
    # A margin so wide that the grown window (where the refiner runs) reaches two crops on.
    assert boxes[7] in BlendGrid(size, crop, (14, 14)).sources([boxes[5]])


def _box_filter(k: int) -> nn.Module:
    conv = nn.Conv2d(3, 2, k, padding=k // 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(2, 3, 1, 1).expand(2, 3, k, k) / k**2 * 6)
    return conv.eval()


def test_blending_removes_the_jumps_at_crop_borders():
    # A filter wider than the margin's context: every crop's answers near its window's edge
    # are off. Cut edge to edge, the map jumps at the crop borders; blended, it changes there
    # no more than elsewhere.
    torch.manual_seed(1)
    backbone = _box_filter(15)
    image = torch.nn.functional.avg_pool2d(torch.randn(1, 3, 100, 100), 9, 1, 4)[0]
    jumps = {}
    for margin in (0, 8):
        pyramid = PyramidConfig(scales=[(96, 96)], crop=32, input=32, margin=margin)
        p = segment(image[:, :96, :96], backbone, pyramid, engine=FP32, return_probs=True).probs[0]
        step = (p[1:] - p[:-1]).abs()  # between rows r and r + 1
        border = step[[31, 63]].mean()
        elsewhere = step[[r for r in range(95) if r not in (31, 63)]].mean()
        jumps[margin] = float(border / elsewhere)
    assert jumps[0] > 3 and jumps[8] < 1.5, jumps


def test_in_order_a_stage_keeps_a_few_rows_of_answers_and_a_pool_gets_the_same_result():
    torch.manual_seed(2)
    backbone = _box_filter(5)
    image = torch.randn(3, 256, 256)
    pyramid = PyramidConfig(scales=[(256, 256)], crop=16, input=16, margin=4)  # 16 x 16 crops
    engine = EngineConfig(precision="fp32", batch_size=4)
    run = StageRun.create(backbone, pyramid, engine=engine)
    peak = []

    class Counted(FineStore):
        def write(self, boxes, windows):
            super().write(boxes, windows)
            peak.append(len(self._tensors))

    def counted(stage, size):
        return Counted(size, pyramid.crop, pyramid.margin_pixels)

    in_order = MemorySink((256, 256), True, torch.device("cpu"))
    run_stages(run, TensorSource(image), lambda s, size: MemoryMap(size), in_order, new_store=counted)
    assert 16 < max(peak) <= 3 * 16 + 4  # rows of answers, not the stage's 256 crops

    # An executor that does each list at once (as a pool does) gets the backbone's answers
    # first, then the steps that read them: the same result, bit for bit.
    kinds = []

    def at_once(jobs, picked_map):
        kinds.append(sorted({job.kind for job in jobs}))
        for job in reversed(jobs):  # any order within a list
            run_job(run, TensorSource(image), job, pooled, picked_map)

    pooled = MemorySink((256, 256), True, torch.device("cpu"))
    run_stages(run, TensorSource(image), lambda s, size: MemoryMap(size), pooled, execute=at_once)
    assert kinds == [["backbone"], ["first"]]
    assert torch.equal(pooled.probs.tensor, in_order.probs.tensor)

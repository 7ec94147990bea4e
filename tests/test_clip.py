"""A window is a clip: ``segment_window`` (only the crops the window depends on) equals the
whole image's ``segment`` on that window bit for bit at fp32, over random windows, image
sizes, pyramids, margins and K; and the spans it reads from are supersets of what the
engine's resampling actually reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from magseg.config import AdaptiveConfig, EngineConfig, PyramidConfig, RefineConfig
from magseg.engine.clip import clip_plan, segment_window, source_span
from magseg.engine.pyramid import crop_boxes
from magseg.engine.refiner_network import Refiner
from magseg.engine.resample import resample_window
from magseg.engine.stages import segment
from magseg.geometry import Rect

FP32 = EngineConfig(precision="fp32", batch_size=3)


class Recorder:
    """A Source that records the rows and columns read from it."""

    def __init__(self, size):
        self.size = size
        self.rows, self.cols = set(), set()

    def read(self, rows, cols):
        self.rows |= set(range(rows.start, rows.stop))
        self.cols |= set(range(cols.start, cols.stop))
        return torch.zeros(1, rows.stop - rows.start, cols.stop - cols.start)


@pytest.mark.parametrize("seed", range(40))
def test_source_span_covers_what_resampling_reads(seed):
    rng = np.random.default_rng(seed)
    n_src = int(rng.integers(3, 200))
    n_dst = int(rng.choice([n_src * 2, n_src * 4, max(1, n_src // 2), int(rng.integers(1, 300))]))
    lo = int(rng.integers(0, n_dst))
    hi = int(rng.integers(lo + 1, n_dst + 1))
    rec = Recorder((n_src, 5))
    resample_window(rec, (n_dst, 5), Rect(lo, 0, hi - lo, 5))
    a, b = source_span(n_src, n_dst, (lo, hi))
    assert rec.rows and min(rec.rows) >= a and max(rec.rows) < b


def _case(seed):
    """A random image size, pyramid, K, margin and window."""
    rng = np.random.default_rng(seed)
    crop = int(rng.choice([16, 24, 32]))
    s0 = int(rng.choice([16, 24, 32, 40]))
    factors = [1, 2, 4] if rng.random() < 0.6 else [1, 2, 3]
    scales = [(s0 * f, s0 * f) for f in factors[: int(rng.integers(1, 4))]]
    margin = [0, 4, 0.25][int(rng.integers(3))]
    pyramid = PyramidConfig(scales=scales, crop=crop, input=32, margin=margin)
    size = (int(rng.integers(20, 170)), int(rng.integers(20, 170)))
    h, w = int(rng.integers(1, size[0] + 1)), int(rng.integers(1, size[1] + 1))
    window = Rect(int(rng.integers(0, size[0] - h + 1)), int(rng.integers(0, size[1] - w + 1)), h, w)
    points = [0.5, 1.0, 0, 200][int(rng.integers(4))]
    border = int(rng.choice([0, 0, 3]))
    return pyramid, RefineConfig(points=points, kernel=3, border=border), size, window


@pytest.mark.parametrize("seed", range(24))
def test_a_window_equals_the_whole_images_result_bit_for_bit(seed, tiny_segmenter):
    torch.manual_seed(seed)
    pyramid, refine, size, window = _case(seed)
    refiner = Refiner(4, 8, 2).eval() if seed % 2 else None
    image = torch.randn(3, *size)
    whole = segment(image, tiny_segmenter.backbone, pyramid, refiner=refiner, refine=refine, engine=FP32,
                    return_probs=True)
    labels, probs = segment_window(image, tiny_segmenter.backbone, pyramid, window, refiner=refiner,
                                   refine=refine, engine=FP32, return_probs=True)
    assert torch.equal(labels, whole.labels[window.slices])
    assert torch.equal(probs, whole.probs[(slice(None), *window.slices)])


def test_a_small_window_runs_few_crops_and_adaptive_runs_all(tiny_segmenter):
    pyramid = PyramidConfig(scales=[(64, 64), (128, 128), (256, 256)], crop=32, input=32, margin=4)
    refine = RefineConfig(points=0.5, kernel=3)
    plan = clip_plan(pyramid, refine, (256, 256), Rect(100, 100, 16, 16))
    total = [len(crop_boxes(s, (32, 32))) for s in pyramid.stage_sizes((256, 256))]
    assert [len(b) for b in plan.stages][-1] <= 4 < total[-1]
    assert plan.crops < sum(total) and plan.final == []
    assert clip_plan(pyramid, refine, (256, 256), Rect(0, 0, 256, 256)).crops == sum(total)
    assert clip_plan(pyramid, refine, (256, 256), Rect(0, 0, 8, 8), adaptive=True) is None
    with pytest.raises(ValueError, match="not inside"):
        clip_plan(pyramid, refine, (256, 256), Rect(250, 0, 8, 8))
    image = torch.randn(3, 256, 256)
    engine = EngineConfig(precision="fp32", adaptive=AdaptiveConfig(max_crops=3))
    whole = segment(image, tiny_segmenter.backbone, pyramid, refine=refine, engine=engine)
    labels, _ = segment_window(image, tiny_segmenter.backbone, pyramid, Rect(100, 90, 30, 40), refine=refine,
                               engine=engine)
    assert torch.equal(labels, whole.labels[100:130, 90:130])


@pytest.mark.parametrize("seed", range(4))
def test_predict_with_a_bbox_equals_segment_of_the_whole_raster_on_it(tmp_path, fitted_checkpoint, seed):
    from geotiff import TRANSFORM, read_raster, smooth_image, write_raster

    from magseg.io.aoi import AreaOfInterest
    from magseg.run.predict import PredictOptions, predict_raster
    from magseg.segmenter import Segmenter

    rng = np.random.default_rng(seed)
    size = (int(rng.integers(40, 200)), int(rng.integers(40, 200)))
    h, w = int(rng.integers(1, size[0] // 2)), int(rng.integers(1, size[1] // 2))
    top, left = int(rng.integers(0, size[0] - h)), int(rng.integers(0, size[1] - w))
    fitted = Segmenter.from_checkpoint(fitted_checkpoint)
    segmenter = Segmenter(fitted.config.override(["engine.precision=fp32", f"engine.batch_size={1 + seed}",
                                                  f"pyramid.margin={[0, 4][seed % 2]}",
                                                  f"refine.border={[0, 2][seed // 2]}"]),
                          fitted.backbone, fitted.refiner)
    image = smooth_image(3, *size, cell=16, seed=seed)
    path = write_raster(tmp_path / "scene.tif", image)
    (x0, y0), (x1, y1) = TRANSFORM @ (left + 0.25, top + 0.25), TRANSFORM @ (left + w - 0.25, top + h - 0.25)
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    aoi = AreaOfInterest(({"type": "Polygon", "coordinates": [ring]},))
    result = predict_raster(segmenter, path, tmp_path / "out", PredictOptions(aoi=aoi))
    assert (result.height, result.width) == (h, w)
    labels = read_raster(tmp_path / "out" / "scene.tif")[0][0]
    whole = segmenter.segment(segmenter.normalize(image)).labels.numpy()
    np.testing.assert_array_equal(labels, whole[top : top + h, left : left + w])

"""A training sample reads and resizes only its window of the scene, and gets the pixels
inference gets: the engine's ``resample_window`` of that window, which are the whole stage
image's pixels cut at the window (bit for bit, at every factor of the stage tests here);
masks (nearest-exact) always equal the whole mask resized and cut.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import CONFIGS
from stage_cuts import image_windows
from test_datasets import geotiff_config, make_deepglobe, make_geotiff

from magseg.config import load_config
from magseg.data.cache import SceneCache
from magseg.data.scenes import list_scenes
from magseg.engine.pyramid import context_windows, crop_windows, resize
from magseg.engine.resample import TensorSource, resample_window, resample_windows
from magseg.geometry import Rect
from magseg.training.samples import (
    BackboneSamples,
    EpochSampler,
    RefinerSamples,
    SceneWindows,
    load_scene,
    stage_crop,
    stage_mask,
)
from magseg.training.windows import (
    mask_window,
    nearest_indices,
    random_box,
    resize_mask,
)


def _stage_image(image, size):
    """The engine's whole stage image: ``image`` (C, H, W) at ``size``."""
    return resample_window(TensorSource(image), size, Rect.of_size(size))


def _whole_scene(image, mask, size, box, crop, ratios=()):
    """The reference: the whole scene at the stage's size, then the window cut out."""
    window, contexts = image_windows(_stage_image(image, size), box, crop, ratios)
    return window, contexts, mask_window(resize_mask(mask, size), box, crop)


MEAN, STD = (90.0, 100.0, 110.0), (50.0, 60.0, 70.0)


def _mean_std(config):
    return config.override({"data.mean": list(MEAN), "data.std": list(STD)})


def _scene(scene_size, crop, seed=0):
    """A random raw scene, its mask, its normalised image and a config with that crop."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (3, *scene_size), dtype=np.uint8)
    mask = rng.integers(0, 4, scene_size, dtype=np.uint8)
    config = load_config(CONFIGS / "tiny.yaml", [f"pyramid.crop={list(crop)}", f"data.mean={list(MEAN)}",
                                                 f"data.std={list(STD)}"])
    image = torch.from_numpy(raw).float()
    image = (image - torch.tensor(MEAN).view(-1, 1, 1)) / torch.tensor(STD).view(-1, 1, 1)
    return rng, raw, mask, image, config


@pytest.mark.parametrize("scene_size,stage,crop,ratios", [
    ((128, 128), (32, 32), (32, 32), ()),          # 4x: the tiny/DeepGlobe stage 0
    ((128, 128), (64, 64), (32, 32), ()),          # 2x
    ((128, 128), (128, 128), (32, 32), ()),        # 1x: no resize
    ((128, 96), (32, 24), (32, 32), ()),           # a stage smaller than the crop: padding
    ((128, 128), (64, 64), (32, 32), (2.0, 3.0)),  # FCtL contexts reaching outside
    ((120, 100), (48, 40), (16, 16), ()),          # 5:2, no power of two
    ((100, 90), (63, 71), (16, 16), ()),           # both axes by odd ratios
    ((100, 90), (63, 71), (16, 16), (2.0,)),       # odd ratios, with a context
    ((64, 64), (160, 96), (32, 32), ()),           # growing (bilinear upsampling)
])
def test_window_read_equals_whole_stage_image_then_cut(scene_size, stage, crop, ratios):
    rng, raw, mask, image, config = _scene(scene_size, crop)
    scene = SceneWindows(raw, mask)
    for _ in range(12):
        box = random_box(rng, stage, crop)
        want, want_ctx, want_mask = _whole_scene(image, torch.from_numpy(mask), stage, box, crop, ratios)
        got, got_ctx = stage_crop(scene, stage, box, config, ratios)
        assert torch.equal(stage_mask(scene, stage, box, crop), want_mask)
        assert len(got_ctx) == len(want_ctx) == len(ratios)
        for a, b in zip([got, *got_ctx], [want, *want_ctx]):
            assert a.shape == b.shape and torch.equal(a, b), (box, (a - b).abs().max())


@pytest.mark.parametrize("scene_size,stage,crop,ratios", [
    ((128, 128), (32, 32), (32, 32), (2.0,)),      # the engine's integer shrink
    ((100, 90), (63, 71), (16, 16), (2.0, 3.0)),   # the tap-by-tap filter
    ((64, 64), (128, 192), (32, 32), ()),          # an integer enlargement
    ((48, 48), (144, 144), (80, 80), ()),          # an integer enlargement by F.interpolate's parts
])
def test_window_read_equals_the_engines_crop(scene_size, stage, crop, ratios):
    # The engine's window of a crop at this box at the stage (resample_windows) from the
    # image in memory, at any factor, integer enlargements included (where windows and the
    # whole map may differ in the last bits, the two still agree bit for bit).
    rng, raw, mask, image, config = _scene(scene_size, crop, seed=1)
    scene = SceneWindows(raw, mask)
    for _ in range(8):
        box = random_box(rng, stage, crop)
        windows = crop_windows([box], crop)
        got, got_ctx = stage_crop(scene, stage, box, config, ratios)
        assert torch.equal(got, resample_windows(TensorSource(image), stage, windows)[0])
        for r, ctx in zip(ratios, got_ctx):
            assert torch.equal(ctx, resample_windows(TensorSource(image), stage, context_windows(windows, r))[0])


class _ReadSpy(SceneWindows):
    """A scene that records every ``image(rows, cols)`` read."""

    def __init__(self, image, mask):
        super().__init__(image, mask)
        self.reads = []

    def image(self, rows, cols):
        self.reads.append((rows, cols))
        return super().image(rows, cols)


def _support(n_src, n_dst, start, length):
    """Source pixels ``[a, b)`` an output range ``[start, start + length)`` of an ``n_src ->
    n_dst`` axis may read: the filter reaches ``max(scale, 1)`` source pixels past the
    range (one more for rounding), clipped to the grid and the axis."""
    lo, hi = max(start, 0), min(start + length, n_dst)
    scale = n_src / n_dst
    reach = max(scale, 1.0)
    return max(math.floor(lo * scale - reach) - 1, 0), min(math.ceil(hi * scale + reach) + 1, n_src)


@pytest.mark.parametrize("scene_size,stage,crop,ratios", [
    ((2448, 2448), (1224, 1224), (612, 612), ()),  # DeepGlobe's stage 1
    ((2448, 2448), (612, 612), (306, 306), ()),    # DeepGlobe's stage 0 with a smaller crop
    ((120, 100), (48, 40), (16, 16), (2.0,)),      # 5:2 with a context
    ((100, 90), (63, 71), (16, 16), ()),           # odd ratios
    ((64, 64), (160, 96), (32, 32), ()),           # growing
])
def test_a_sample_reads_only_the_pixels_its_windows_need(scene_size, stage, crop, ratios):
    rng, raw, mask, _, config = _scene(scene_size, crop, seed=2)
    for _ in range(4):
        scene = _ReadSpy(raw, mask)
        box = random_box(rng, stage, crop)
        (window,) = crop_windows([box], crop)
        windows = [window] + [w for r in ratios for w in context_windows([window], r)]
        stage_crop(scene, stage, box, config, ratios)
        assert scene.reads
        supports = [(_support(scene_size[0], stage[0], t, h), _support(scene_size[1], stage[1], l, w))
                    for t, l, h, w in ((r.top, r.left, r.height, r.width) for r in windows)]
        for rows, cols in scene.reads:
            assert any(r0 <= rows.start and rows.stop <= r1 and c0 <= cols.start and cols.stop <= c1
                       for (r0, r1), (c0, c1) in supports), (rows, cols, supports)
        # In all, no more pixels than the windows' supports hold.
        read = sum((rows.stop - rows.start) * (cols.stop - cols.start) for rows, cols in scene.reads)
        assert read <= sum((r1 - r0) * (c1 - c0) for (r0, r1), (c0, c1) in supports)
    assert nearest_indices(8, 4).tolist() == resize_mask(torch.arange(8)[None].repeat(8, 1), (4, 4))[0].tolist()


@pytest.mark.parametrize("layout", ["deepglobe", "geotiff"])
def test_samples_equal_the_whole_scene_path(tmp_path, tiny_config, layout):
    # The datasets, cached (deepglobe) or windowed (geotiff), against the reference built
    # from load_scene, for backbone and refiner items.
    if layout == "deepglobe":
        config = _mean_std(tiny_config)
        root = make_deepglobe(tmp_path / "data", config)
    else:
        config = geotiff_config(tiny_config, bands=4).override(
            {"data.mean": [3200.0] * 4, "data.std": [3000.0] * 4})
        root = make_geotiff(tmp_path / "data", config)
    # Crop-sized windows, as the reference cuts them (test_margins samples them with margins).
    config = config.override({"train.margin": 0})
    scenes = list_scenes(config.data, "train", root)
    cache = SceneCache(tmp_path / "cache", config)
    pyramid = config.pyramid
    backbone = BackboneSamples(scenes, config, 16, seed=3, augment=False, cache=cache)
    refiner = RefinerSamples(scenes, config, 16, seed=3, cache=cache)
    for index in range(16):
        rng = backbone._rng(index)
        image, mask = load_scene(scenes[int(rng.integers(len(scenes)))], config)
        sizes = pyramid.stage_sizes(tuple(image.shape[-2:]))
        size = sizes[int(rng.integers(len(sizes)))]
        box = random_box(rng, size, pyramid.crop)
        window, _, target = _whole_scene(image, mask, size, box, pyramid.crop)
        crop, got_target = backbone[index].image, backbone[index].mask
        assert torch.equal(crop, resize(window, pyramid.input))
        assert torch.equal(got_target, resize_mask(target, pyramid.input))

        rng = refiner._rng(index)
        image, mask = load_scene(scenes[int(rng.integers(len(scenes)))], config)
        sizes = pyramid.stage_sizes(tuple(image.shape[-2:]))
        size = sizes[1 + int(rng.integers(len(sizes) - 1))]
        box = random_box(rng, size, pyramid.crop)
        window, _, target = _whole_scene(image, mask, size, box, pyramid.crop)
        item = refiner[index]
        assert torch.equal(item.fine, window) and torch.equal(item.mask, target)
        assert torch.equal(item.scene0, _stage_image(image, sizes[0]))
    if layout == "deepglobe":
        assert len(list((tmp_path / "cache" / "scenes").glob("*.npy"))) == len(scenes)
    else:  # GeoTIFFs are read by windows: nothing cached
        assert not (tmp_path / "cache" / "scenes").exists()


def test_persistent_workers_sample_the_main_process_epoch(tmp_path, tiny_config):
    # The epoch travels with each index: a worker's own copy of the dataset is never asked.
    config = _mean_std(tiny_config)
    root = make_deepglobe(tmp_path / "data", config)
    scenes = list_scenes(config.data, "train", root)
    dataset = BackboneSamples(scenes, config, 4, seed=0, cache=SceneCache(tmp_path / "c", config))
    sampler = EpochSampler(range(4), dataset)
    dataset.set_epoch(3)
    keys = list(sampler)
    assert keys == [(3, i) for i in range(4)] and len(sampler) == 4
    dataset.set_epoch(0)  # what a worker's stale copy would hold
    assert torch.equal(dataset[keys[1]].image, (dataset.set_epoch(3), dataset[1])[1].image)


def test_geotiff_windows_read_masks_through_the_class_map(tmp_path, tiny_config):
    # Masks coded 10, 20, ... (data.class_map): a window's labels are what read_mask makes
    # of the whole mask.
    import rasterio

    config = geotiff_config(tiny_config, bands=4).override(
        {"data.mean": [3200.0] * 4, "data.std": [3000.0] * 4,
         "data.class_map": {10: 0, 20: 1, 30: 2, 40: 3}})
    root = make_geotiff(tmp_path / "data", config)
    for path in (root / "masks").glob("*.tif"):
        with rasterio.open(path, "r+") as dst:
            dst.write((dst.read() + 1) * 10)
    scenes = list_scenes(config.data, "train", root)
    samples = RefinerSamples(scenes, config, 8, seed=5)
    pyramid = config.pyramid
    for index in range(8):
        rng = samples._rng(index)
        image, mask = load_scene(scenes[int(rng.integers(len(scenes)))], config)
        sizes = pyramid.stage_sizes(tuple(image.shape[-2:]))
        size = sizes[1 + int(rng.integers(len(sizes) - 1))]
        box = random_box(rng, size, pyramid.crop)
        assert torch.equal(samples[index].mask, _whole_scene(image, mask, size, box, pyramid.crop)[2])

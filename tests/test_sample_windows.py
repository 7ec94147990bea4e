"""A training sample reads and resizes only its window of the scene, and gets the pixels the
whole-scene path gave: the scene resized to the stage's size, then the window cut out.

Bit-for-bit where the scene's size over the stage's is an integer or a power of two (every
pyramid of doubling scales on scenes of ``scales[-1]``: the filter centres are exact in
float); for other ratios within 5e-5 of a normalised value, a few thousandths of a grey
level (float rounding of the filter centres, see ``windows.region_plan``); masks always exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CONFIGS
from test_datasets import geotiff_config, make_deepglobe, make_geotiff

from magseg.config import load_config
from magseg.data.cache import SceneCache
from magseg.data.scenes import list_scenes
from magseg.engine.pyramid import resize
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
    image_windows,
    mask_window,
    nearest_indices,
    random_box,
    region_plan,
    resize_mask,
)


def _whole_scene(image, mask, size, box, crop, ratios=()):
    """The reference: the whole scene resized to the stage, then the window cut out."""
    window, contexts = image_windows(resize(image, size), box, crop, ratios)
    return window, contexts, mask_window(resize_mask(mask, size), box, crop)


def _mean_std(config):
    return config.override({"data.mean": [90.0, 100.0, 110.0], "data.std": [50.0, 60.0, 70.0]})


@pytest.mark.parametrize("scene_size,stage,crop,ratios,exact", [
    ((128, 128), (32, 32), (32, 32), (), True),       # 4x: the tiny/DeepGlobe stage 0
    ((128, 128), (64, 64), (32, 32), (), True),       # 2x
    ((128, 128), (128, 128), (32, 32), (), True),     # 1x: no resize
    ((128, 96), (32, 24), (32, 32), (), True),        # a stage smaller than the crop: padding
    ((128, 128), (64, 64), (32, 32), (2.0, 3.0), True),  # FCtL contexts reaching outside
    ((120, 100), (48, 40), (16, 16), (), False),      # 5:2, no power of two
    ((100, 90), (63, 71), (16, 16), (), False),       # both axes by odd ratios
    ((64, 64), (160, 96), (32, 32), (), False),       # growing (bilinear upsampling)
])
def test_window_read_equals_whole_scene_resize_then_cut(scene_size, stage, crop, ratios, exact):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (3, *scene_size), dtype=np.uint8)
    mask = rng.integers(0, 4, scene_size, dtype=np.uint8)
    mean, std = (90.0, 100.0, 110.0), (50.0, 60.0, 70.0)
    config = load_config(CONFIGS / "tiny.yaml", [f"pyramid.crop={list(crop)}", f"data.mean={list(mean)}",
                                                 f"data.std={list(std)}"])
    image = torch.from_numpy(raw).float()
    image = (image - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    scene = SceneWindows(raw, mask)
    for _ in range(12):
        box = random_box(rng, stage, crop)
        want, want_ctx, want_mask = _whole_scene(image, torch.from_numpy(mask), stage, box, crop, ratios)
        got, got_ctx = stage_crop(scene, stage, box, config, ratios)
        assert torch.equal(stage_mask(scene, stage, box, crop), want_mask)
        for a, b in zip([got, *got_ctx], [want, *want_ctx]):
            assert a.shape == b.shape
            if exact:
                assert torch.equal(a, b), (box, (a - b).abs().max())
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=5e-5)


def test_region_plan_reads_only_what_the_window_needs():
    # DeepGlobe's stage 0: a 612 window of the 1224 stage reads at most 2 x (612 + margins).
    o0, o1, s0, s1 = region_plan(2448, 1224, 600, 612)
    assert o0 <= 600 and o1 >= 1212 and (s1 - s0) == 2 * (o1 - o0) and s1 - s0 < 2 * 700
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
        crop, got_target = backbone[index]
        assert torch.equal(crop, resize(window, pyramid.input))
        assert torch.equal(got_target, resize_mask(target, pyramid.input))

        rng = refiner._rng(index)
        image, mask = load_scene(scenes[int(rng.integers(len(scenes)))], config)
        sizes = pyramid.stage_sizes(tuple(image.shape[-2:]))
        size = sizes[1 + int(rng.integers(len(sizes) - 1))]
        box = random_box(rng, size, pyramid.crop)
        window, _, target = _whole_scene(image, mask, size, box, pyramid.crop)
        item = refiner[index]
        assert torch.equal(item["fine"], window) and torch.equal(item["mask"], target)
        assert torch.equal(item["scene0"], resize(image, sizes[0]))
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
    assert torch.equal(dataset[keys[1]][0], (dataset.set_epoch(3), dataset[1])[1][0])


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
        assert torch.equal(samples[index]["mask"], _whole_scene(image, mask, size, box, pyramid.crop)[2])

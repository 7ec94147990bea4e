"""Context margins (``pyramid.margin``): each crop's backbone sees its window grown by the
margin where the stage has pixels and keeps its own part. Windows by hand; a model whose
output depends on a neighbourhood gives the whole image's result with the margin and not
without; the invariants (K = 1 without a refiner = patch-only, streamed = in memory) hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CONFIGS
from geotiff import read_raster, smooth_image, write_raster
from torch import nn

from magseg.config import EngineConfig, PyramidConfig, RefineConfig, load_config
from magseg.engine.pyramid import crop_boxes, grown_extent, grown_input, grown_windows
from magseg.engine.stages import segment
from magseg.geometry import Rect
from magseg.io.raster import NODATA, VALUE_MAX
from magseg.run.predict import PredictOptions, predict_raster
from magseg.segmenter import Segmenter

FP32 = EngineConfig(precision="fp32")


def test_margin_config_in_pixels_or_a_fraction_of_the_crop():
    p = PyramidConfig(scales=[(64, 64)], crop=(16, 32), input=(16, 32), margin=0.25)
    assert p.margin_pixels == (4, 8)
    assert PyramidConfig(scales=[(64, 64)], crop=16, input=16, margin=3).margin_pixels == (3, 3)
    assert p.patch_only().margin == p.downsample_only().margin == 0.25
    for bad in (-1, 1.0, 2.5):
        with pytest.raises(ValueError, match="pyramid.margin"):
            PyramidConfig(scales=[(64, 64)], crop=16, input=16, margin=bad)


def test_grown_windows_by_hand():
    assert grown_extent(100, 16, 4) == 24 and grown_extent(20, 16, 4) == 20
    assert grown_extent(16, 16, 4) == 16 and grown_extent(10, 16, 4) == 16 and grown_extent(100, 16, 0) == 16
    # 40 px in crops of 16: crops at 0, 16, 24; windows of 24 start at 0, 12, 16.
    boxes = crop_boxes((40, 16), (16, 16))
    windows, offsets, extent = grown_windows(boxes, (16, 16), (40, 16), (4, 4))
    assert extent == (24, 16)
    assert [(w.top, w.left) for w in windows] == [(0, 0), (12, 0), (16, 0)]
    assert offsets == [(0, 0), (4, 0), (8, 0)]
    # Without a margin: the crops' own windows.
    assert grown_windows(boxes, (16, 16), (40, 16), (0, 0)) == (
        [Rect(b.window.top, b.window.left, 16, 16) for b in boxes], [(0, 0)] * 3, (16, 16))
    assert grown_input((32, 32), (16, 16), (24, 16)) == (48, 32)


@pytest.mark.parametrize("size", [(40, 40), (100, 90), (77, 131), (20, 45), (64, 17)])
@pytest.mark.parametrize("margin", [1, 3, 6])
def test_every_window_holds_its_crop_inside_the_image(size, margin):
    crop = (16, 16)
    boxes = crop_boxes(size, crop)
    windows, offsets, extent = grown_windows(boxes, crop, size, (margin, margin))
    for b, w, (dy, dx) in zip(boxes, windows, offsets):
        (top, left), (eh, ew) = (w.top, w.left), w.size
        assert (top + dy, left + dx) == (b.window.top, b.window.left)
        assert 0 <= dy and dy + 16 <= eh and 0 <= dx and dx + 16 <= ew
        for start, e, length in ((top, eh, size[0]), (left, ew, size[1])):
            if length > 16:  # only real pixels; an axis of one crop is padded as without a margin
                assert 0 <= start and start + e <= length and e == min(16 + 2 * margin, length)


def _box_filter_backbone(classes: int = 3, k: int = 5) -> nn.Module:
    """A backbone whose logits at a pixel are a mean over a k x k neighbourhood (zero padded):
    a crop's border pixels need ``k // 2`` pixels of context to be the whole image's."""
    conv = nn.Conv2d(3, classes, k, padding=k // 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(classes, 3, 1, 1).expand(classes, 3, k, k) / k**2 * 4)
    return conv.eval()


def test_with_a_margin_crops_give_the_whole_images_result():
    torch.manual_seed(0)
    backbone = _box_filter_backbone()
    image = torch.randn(3, 70, 53)
    whole = backbone(image[None])[0].softmax(0)
    pyramid = PyramidConfig(scales=[(70, 53)], crop=16, input=16)
    without = segment(image, backbone, pyramid, engine=FP32, return_probs=True).probs
    # The blend reads answers up to half the margin beyond a crop's own part: they have the
    # k // 2 = 2 pixels of context the filter needs with a margin of 4, not of 2.
    with_margin = segment(image, backbone, PyramidConfig(scales=[(70, 53)], crop=16, input=16, margin=4),
                          engine=FP32, return_probs=True).probs
    torch.testing.assert_close(with_margin, whole, atol=1e-5, rtol=0)
    short = segment(image, backbone, PyramidConfig(scales=[(70, 53)], crop=16, input=16, margin=2),
                    engine=FP32, return_probs=True).probs
    assert (short - whole).abs().amax() > 1e-2
    assert (without - whole).abs().amax() > 1e-2  # the crop borders, without context


@pytest.mark.parametrize("margin, border", [(2, 0), (0.25, 0), (4, 3)])
@pytest.mark.parametrize("size", [(128, 128), (100, 90), (20, 45)])
def test_k_all_without_refiner_is_patch_only_with_margins(size, margin, border, tiny_segmenter):
    pyramid = PyramidConfig(scales=[(32, 32), (64, 64), (128, 128)], crop=32, input=32, margin=margin)
    image = torch.randn(3, *size)
    backbone = tiny_segmenter.backbone
    # K = all picks every pixel, the border term only orders the picks.
    progressive = segment(image, backbone, pyramid, refine=RefineConfig(points=1.0, border=border), engine=FP32,
                          return_probs=True, return_stages=True)
    patch = segment(image, backbone, pyramid.patch_only(), engine=FP32, return_probs=True)
    assert torch.equal(progressive.probs, patch.probs)
    # The crop counts are the crops of each stage, margins or not.
    sizes = pyramid.stage_sizes(size)
    assert [s.crops_run for s in progressive.stages] == [len(crop_boxes(s, (32, 32))) for s in sizes]


def test_pixel_local_model_with_margins_labels_every_pixel_exactly(tmp_path):
    # A misplaced offset into the grown window would move these labels.
    config = load_config(CONFIGS / "tiny.yaml", [
        "pyramid.scales=[16,32,64]", "pyramid.crop=16", "pyramid.input=16", "pyramid.margin=3",
        "refine.points=1.0", "refiner.enabled=false", "engine.precision=fp32"])
    conv = nn.Conv2d(3, 4, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [-1, -1, -1]])[..., None, None])
        conv.bias.copy_(torch.tensor([0.0, 0.1, -0.1, -0.5]))
    segmenter = Segmenter(config, conv.eval())
    image = smooth_image(3, 150, 170, seed=1)
    path = write_raster(tmp_path / "scene.tif", image)
    result = predict_raster(segmenter, path, tmp_path / "out")
    with torch.no_grad():
        expected = conv(segmenter.normalize(image)[None])[0].argmax(0).numpy().astype(np.uint8)
    np.testing.assert_array_equal(read_raster(tmp_path / "out" / "scene.tif")[0][0], expected)
    assert result.crops == sum(len(crop_boxes(s, (16, 16))) for s in config.pyramid.stage_sizes((150, 170)))


@pytest.mark.parametrize("size", [(160, 192), (101, 67), (13, 40)])
@pytest.mark.parametrize("margin, border", [(4, 0), (0.25, 0), (4, 2)])
def test_streamed_predict_equals_segment_with_margins_bit_for_bit(tmp_path, fitted_checkpoint, size, margin,
                                                                  border, refine_path):
    fitted = Segmenter.from_checkpoint(fitted_checkpoint)
    height, width = size
    image = smooth_image(3, height, width, cell=16, seed=height + width)
    image[:, height // 3 : height // 3 + 4, : width // 2] = 0  # nodata
    valid = image.any(axis=0)
    segmenter = Segmenter(fitted.config.override(["engine.batch_size=3", "engine.precision=fp32",
                                                  f"pyramid.margin={margin}", f"refine.border={border}"]),
                          fitted.backbone, fitted.refiner)
    path = write_raster(tmp_path / "scene.tif", image, nodata=0)  # the zero band is declared nodata
    predict_raster(segmenter, path, tmp_path / "out", PredictOptions(probs=True))
    x = segmenter.normalize(image)
    x[:, torch.from_numpy(~valid)] = 0
    want = segmenter.segment(x, return_probs=True)
    want_labels = want.labels.numpy().copy()
    want_labels[~valid] = NODATA
    np.testing.assert_array_equal(read_raster(tmp_path / "out" / "scene.tif")[0][0], want_labels)
    probs = read_raster(tmp_path / "out" / "scene_probs.tif")[0]
    np.testing.assert_array_equal(probs[:, valid],
                                  (want.probs.clamp(0, 1) * VALUE_MAX).round().to(torch.uint8).numpy()[:, valid])
    # The margin changed the result (the model sees context it did not see without).
    plain = Segmenter(fitted.config.override(["engine.precision=fp32"]), fitted.backbone, fitted.refiner)
    assert not torch.equal(plain.segment(x, return_probs=True).probs, want.probs)


def test_training_samples_see_the_window_with_its_margins(tmp_path, tiny_config):
    # Backbone samples: a random window of crop + 2 margins at the stage's magnification,
    # at the grown input (the engine's scale). Refiner samples: the engine's grown window of
    # the crop, the crop at ``offset`` in it, mask and box the crop's own.
    from test_datasets import make_deepglobe

    from magseg.data.scenes import list_scenes
    from magseg.engine.pyramid import resize
    from magseg.engine.resample import TensorSource, resample_window
    from magseg.training.samples import BackboneSamples, RefinerSamples, load_scene
    from magseg.training.windows import mask_window, random_box, resize_mask

    config = tiny_config.override({"data.mean": [90.0, 100.0, 110.0], "data.std": [50.0, 60.0, 70.0],
                                   "pyramid.margin": 4})
    root = make_deepglobe(tmp_path / "data", config)
    scenes = list_scenes(config.data, "train", root)
    pyramid = config.pyramid  # 32 -> 64 -> 128, crop 32, input 32; windows of 40 at input 40
    backbone = BackboneSamples(scenes, config, 6, seed=3, augment=False)
    refiner = RefinerSamples(scenes, config, 6, seed=3)
    for index in range(6):
        rng = backbone._rng(index)
        image, mask = load_scene(scenes[int(rng.integers(len(scenes)))], config)
        sizes = pyramid.stage_sizes(tuple(image.shape[-2:]))
        size = sizes[int(rng.integers(len(sizes)))]
        box = random_box(rng, size, (40, 40))
        stage = resample_window(TensorSource(image), size, Rect.of_size(size))
        window = torch.zeros(3, 40, 40)
        window[:, : box.window.height, : box.window.width] = stage[(slice(None), *box.window.slices)]
        target = mask_window(resize_mask(mask, size), box, (40, 40))
        crop, got = backbone[index].image, backbone[index].mask
        assert crop.shape[-2:] == (40, 40)
        assert torch.equal(crop, resize(window, (40, 40))) and torch.equal(got, target)

        item = refiner[index]
        rng = refiner._rng(index)
        image, mask = load_scene(scenes[int(rng.integers(len(scenes)))], config)
        sizes = pyramid.stage_sizes(tuple(image.shape[-2:]))
        size = sizes[1 + int(rng.integers(len(sizes) - 1))]
        box = random_box(rng, size, pyramid.crop)
        (grown,), (offset,), extent = grown_windows([box], pyramid.crop, size, (4, 4))
        stage = resample_window(TensorSource(image), size, Rect.of_size(size))
        assert item.fine.shape[-2:] == (40, 40) and tuple(item.offset.tolist()) == offset
        top, left = grown.top, grown.left
        assert torch.equal(item.fine[:, : extent[0], : extent[1]],
                           stage[:, top : top + extent[0], left : left + extent[1]])
        dy, dx = offset
        assert torch.equal(item.fine[:, dy : dy + 32, dx : dx + 32], stage[(slice(None), *box.window.slices)])


def test_train_margin_sets_the_training_windows_apart_from_the_prediction_margin(tmp_path, tiny_config):
    from test_datasets import make_deepglobe

    from magseg.data.scenes import list_scenes
    from magseg.training.samples import BackboneSamples, RefinerSamples, training_margin, training_window

    config = tiny_config.override({"pyramid.margin": 4})  # crop 32
    assert training_margin(config) == (4, 4) and training_window(config) == (40, 40)  # None: as predicted
    crops = config.override({"train.margin": 0})
    assert training_margin(crops) == (0, 0) and training_window(crops) == (32, 32)
    assert crops.pyramid.margin_pixels == (4, 4)  # prediction keeps its margin
    assert training_window(config.override({"train.margin": 0.25})) == (48, 48)
    scenes = list_scenes(crops.data, "train", make_deepglobe(tmp_path / "data", crops))
    assert BackboneSamples(scenes, crops, 2, seed=0, augment=False)[0].image.shape[-2:] == (32, 32)
    item = RefinerSamples(scenes, crops, 2, seed=0)[0]
    assert item.fine.shape[-2:] == (32, 32) and item.offset.tolist() == [0, 0]
    for bad in (-1, 1.0):
        with pytest.raises(ValueError, match="train.margin"):
            tiny_config.override({"train.margin": bad})


def test_refiner_loss_cuts_the_fine_view_as_the_engine_does(tmp_path, tiny_config):
    from test_datasets import make_deepglobe

    from magseg.data.scenes import list_scenes
    from magseg.engine.pyramid import CropBox
    from magseg.engine.resample import TensorSource, resample_window
    from magseg.engine.stages import StageRun
    from magseg.segmenter import create_segmenter_model
    from magseg.training.batches import collate_refiner
    from magseg.training.refiner_phase import refiner_loss
    from magseg.training.samples import RefinerSamples, load_scene
    from magseg.training.state import RunPrecision

    config = tiny_config.override({"data.mean": [90.0, 100.0, 110.0], "data.std": [50.0, 60.0, 70.0],
                                   "pyramid.margin": 4, "engine.precision": "fp32"})
    root = make_deepglobe(tmp_path / "data", config)
    scenes = list_scenes(config.data, "train", root)
    backbone = create_segmenter_model(config).eval()
    samples = RefinerSamples(scenes, config, 3, seed=1)
    batch = collate_refiner([samples[i] for i in range(3)])
    seen = {}

    def refiner(fine, coarse):
        seen["fine"] = fine
        return torch.zeros_like(fine, requires_grad=True)

    refiner_loss(refiner, backbone, batch, config, RunPrecision.resolve(config, torch.device("cpu")))
    # The engine's fine view of the same crop: its stage image, the crop's box, StageRun.fine.
    run = StageRun.create(backbone, config.pyramid, engine=config.engine)
    for i in range(3):
        rng = samples._rng(i)
        image, _ = load_scene(scenes[int(rng.integers(len(scenes)))], config)
        size = tuple(int(v) for v in batch.size[i])
        top, left, h, w = (int(v) for v in batch.box[i])
        stage = resample_window(TensorSource(image), size, Rect.of_size(size))
        want = run.fine(TensorSource(stage), size, [CropBox.whole(Rect(top, left, h, w))])
        torch.testing.assert_close(seen["fine"][i], want[0], atol=1e-5, rtol=0)


def test_border_band_and_the_border_term_picks_border_pixels_last():
    from magseg.engine.refine_step import border_band, picked_pixels

    boxes = crop_boxes((16, 24), (8, 8))  # 2 x 3 crops
    band = border_band(boxes, (8, 8), (16, 24), 2)
    # The top-left crop borders others below and to the right only.
    expect = torch.zeros(8, 8, dtype=torch.bool)
    expect[6:, :] = True
    expect[:, 6:] = True
    assert torch.equal(band[0], expect)
    # The middle crop of the bottom row: above, left and right.
    expect = torch.zeros(8, 8, dtype=torch.bool)
    expect[:2, :] = True
    expect[:, :2] = True
    expect[:, 6:] = True
    assert torch.equal(band[4], expect)

    torch.manual_seed(0)
    coarse = torch.rand(6, 3, 8, 8).softmax(1)
    refined = torch.rand(6, 3, 8, 8).softmax(1)
    inner = (~band).flatten(1).sum(1)
    for k in (10, 40, 60):
        picked = picked_pixels(coarse, refined, boxes, RefineConfig(points=k, kernel=3, border=2), (16, 24))
        assert picked.flatten(1).sum(1).tolist() == [k] * 6
        for i in range(6):
            if k <= inner[i]:
                assert not (picked[i] & band[i]).any()
            else:
                assert picked[i][~band[i]].all()
    # Without the stage size (or border 0) the pick is the plain top-K.
    plain = picked_pixels(coarse, refined, boxes, RefineConfig(points=10, kernel=3))
    assert torch.equal(plain, picked_pixels(coarse, refined, boxes, RefineConfig(points=10, kernel=3, border=2)))


def test_a_checkpoint_from_before_margins_keeps_predicting_without_them(tmp_path, tiny_config):
    # A margin and a border term are stored in a checkpoint's config. A new config's margin is
    # an eighth of the crop, but a checkpoint whose stored config has no pyramid.margin or
    # refine.border key (written before they existed) reads as margin 0 and border 0 and
    # predicts exactly as it did.
    from magseg.checkpoint import load_checkpoint, save_checkpoint
    from magseg.segmenter import create_refiner, create_segmenter_model

    config = tiny_config.override(["pyramid.margin=4", "refine.border=2"])
    torch.manual_seed(0)
    backbone, refiner = create_segmenter_model(config).eval(), create_refiner(config).eval()
    path = save_checkpoint(tmp_path / "new.ckpt", config, backbone, refiner)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["config"]["pyramid"]["margin"] == 4 and payload["config"]["refine"]["border"] == 2
    del payload["config"]["pyramid"]["margin"], payload["config"]["refine"]["border"]
    torch.save(payload, tmp_path / "old.ckpt")
    old = load_checkpoint(tmp_path / "old.ckpt").config
    assert old.pyramid.margin == 0 and old.refine.border == 0
    image = torch.randn(3, 100, 90)
    plain = Segmenter(config.override(["pyramid.margin=0", "refine.border=0"]), backbone, refiner)
    want = plain.segment(image, return_probs=True)
    got = Segmenter.from_checkpoint(tmp_path / "old.ckpt").segment(image, return_probs=True)
    assert torch.equal(got.labels, want.labels) and torch.equal(got.probs, want.probs)
    # The margin does change this model's output, so the check above could fail.
    assert not torch.equal(Segmenter.from_checkpoint(path).segment(image, return_probs=True).probs, want.probs)

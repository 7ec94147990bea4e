"""Training samples on tiny generated datasets in both layouts (DeepGlobe and GeoTIFF pairs).

The generators here are also used by the training tests: a toy problem where a pixel's
class is given by its colour (plus noise), so a few optimiser steps must lower the loss.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from PIL import Image

from magseg.config import Config
from magseg.data.scenes import IGNORE, check_scene, encode_colors, list_scenes
from magseg.engine.pyramid import extract_crops, resize
from magseg.engine.resample import TensorSource, resample_window
from magseg.errors import DataError
from magseg.geometry import Rect
from magseg.training.batches import collate_refiner
from magseg.training.samples import BackboneSamples, RefinerSamples
from magseg.training.windows import mask_window, random_box, resize_mask

CONFIGS_TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"

# Raw colour of each class in the toy images (class 0 'unknown' is black, as in DeepGlobe).
TOY_COLOURS = np.array([[0, 0, 0], [200, 60, 40], [60, 200, 60], [40, 60, 220]], dtype=np.float64)


def toy_labels(rng: np.random.Generator, size: tuple[int, int], classes: int = 4) -> np.ndarray:
    """``(H, W)`` uint8: a background class with a few rectangles of the others."""
    h, w = size
    labels = np.full((h, w), 1 + rng.integers(classes - 1), dtype=np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        dy, dx = rng.integers(8, max(9, h // 2)), rng.integers(8, max(9, w // 2))
        labels[y : y + dy, x : x + dx] = rng.integers(classes)
    return labels


def toy_image(rng: np.random.Generator, labels: np.ndarray, bands: int = 3, scale: float = 1.0) -> np.ndarray:
    """``(bands, H, W)`` float64 raw pixels: the class colour plus noise (extra bands repeat)."""
    colours = TOY_COLOURS[:, np.arange(bands) % 3] * scale
    image = colours[labels].transpose(2, 0, 1) + rng.normal(0, 12 * scale, (bands, *labels.shape))
    return image


def write_split(root: Path, name: str, ids: list[str]) -> None:
    (root / name).write_text("".join(f"{i}\n" for i in ids))


def make_deepglobe(root: Path, config: Config, counts=(("train", 4), ("val", 2)), size=(128, 128),
                   seed: int = 0) -> Path:
    """``<id>_sat.jpg`` / ``<id>_mask.png`` scenes and split files under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    n = 0
    for split, count in counts:
        ids = []
        for _ in range(count):
            rng = np.random.default_rng([seed, n])
            labels = toy_labels(rng, size, config.num_classes)
            image = np.clip(toy_image(rng, labels), 0, 255).astype(np.uint8)
            Image.fromarray(image.transpose(1, 2, 0)).save(root / f"{n}_sat.jpg", quality=95)
            Image.fromarray(encode_colors(labels, config.classes).transpose(1, 2, 0)).save(
                root / f"{n}_mask.png")
            ids.append(str(n))
            n += 1
        write_split(root, f"{split}.txt", ids)
    return root


def write_geotiff(path: Path, array: np.ndarray, nodata=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", height=array.shape[1], width=array.shape[2],
                       count=array.shape[0], dtype=array.dtype, crs="EPSG:32633",
                       transform=Affine(0.5, 0, 500000, 0, -0.5, 4000000), nodata=nodata) as dst:
        dst.write(array)


def make_geotiff(root: Path, config: Config, counts=(("train", 3), ("val", 2)), size=(96, 112),
                 bands: int = 4, dtype: str = "uint16", seed: int = 0) -> Path:
    """``images/<id>.tif`` (``bands`` bands of ``dtype``) and ``masks/<id>.tif`` (class ids)."""
    n = 0
    scale = 40.0 if dtype == "uint16" else (1 / 255 if dtype == "float32" else 1.0)
    for split, count in counts:
        ids = []
        for _ in range(count):
            rng = np.random.default_rng([seed, 100 + n])
            labels = toy_labels(rng, size, config.num_classes)
            image = np.clip(toy_image(rng, labels, bands, scale), 0, None).astype(dtype)
            write_geotiff(root / "images" / f"s{n}.tif", image)
            write_geotiff(root / "masks" / f"s{n}.tif", labels[None])
            ids.append(f"s{n}")
            n += 1
        write_split(root, f"{split}.txt", ids)
    return root


def geotiff_config(config: Config, bands: int = 4) -> Config:
    return config.override({"data.layout": "geotiff", "data.bands": None,
                            "model.in_channels": bands, "data.mean": None, "data.std": None})


# ---------------------------------------------------------------------------- windows


@pytest.mark.parametrize("size,crop", [((64, 64), (32, 32)), ((20, 50), (32, 32)), ((33, 31), (32, 32))])
def test_random_box_stays_inside_and_is_clipped(size, crop):
    rng = np.random.default_rng(0)
    seen_tops = set()
    for _ in range(200):
        box = random_box(rng, size, crop)
        assert 0 <= box.window.top and box.window.top + box.window.height <= size[0]
        assert 0 <= box.window.left and box.window.left + box.window.width <= size[1]
        assert (box.window.height, box.window.width) == (min(crop[0], size[0]), min(crop[1], size[1]))
        seen_tops.add(box.window.top)
    assert len(seen_tops) == max(size[0] - crop[0], 0) + 1  # every position is reachable


def test_mask_window_pads_with_ignore():
    mask = torch.arange(6).view(2, 3)
    box = random_box(np.random.default_rng(0), (2, 3), (4, 4))
    out = mask_window(mask, box, (4, 4))
    assert out[:2, :3].tolist() == mask.tolist()
    assert (out[2:] == IGNORE).all() and (out[:, 3:] == IGNORE).all()


def test_resize_mask_keeps_labels():
    mask = torch.tensor([[0, 1], [2, 3]])
    assert resize_mask(mask, (4, 4)).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


# ---------------------------------------------------------------------------- samples


def _stats(config: Config) -> Config:
    """Identity normalisation, and crops without a context margin (test_margins samples them
    with one)."""
    return config.override({"data.mean": [0.0] * config.model.in_channels,
                            "data.std": [1.0] * config.model.in_channels, "pyramid.margin": 0})


def test_backbone_samples_deepglobe(tmp_path, tiny_config):
    root = make_deepglobe(tmp_path, tiny_config)
    config = _stats(tiny_config)
    scenes = list_scenes(config.data, "train", root)
    ds = BackboneSamples(scenes, config, length=12, seed=3, augment=False)
    for i in range(len(ds)):
        image, mask = ds[i].image, ds[i].mask
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert mask.shape == (32, 32) and mask.dtype == torch.int64
        assert set(mask.unique().tolist()) <= {0, 1, 2, 3}
        # The toy problem: each labelled pixel's colour is its class colour (JPEG + noise).
        for c in mask.unique().tolist():
            # (Resizing blends colours at borders, so: nearest to its own class colour.)
            mean = image[:, mask == c].mean(1).numpy()
            assert np.linalg.norm(TOY_COLOURS - mean, axis=1).argmin() == c
    # Same (seed, epoch, index) -> same sample; another epoch -> other samples.
    a, b = ds[5], ds[5]
    assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask) and a.contexts is None
    ds.set_epoch(1)
    assert not torch.equal(ds[5].image, a.image)


def test_backbone_samples_cover_every_stage(tmp_path, tiny_config):
    # Scene 128 with scales 32/64/128 and crop 32: a stage-0 window is the whole scene
    # (each class rectangle then covers few pixels), a stage-2 window a quarter of a quarter.
    root = make_deepglobe(tmp_path, tiny_config, counts=(("train", 1),))
    config = _stats(tiny_config)
    scene = list_scenes(config.data, "train", root)[0]
    ds = BackboneSamples([scene], config, length=60, seed=0, augment=False)
    from magseg.training.samples import load_scene

    image, _ = load_scene(scene, config)
    stage0 = resize(image, (32, 32))
    hits = sum(torch.allclose(ds[i].image, stage0, atol=1e-4) for i in range(len(ds)))
    assert 10 <= hits <= 35  # about a third of the samples are the stage-0 view


def test_augmentation_moves_image_and_mask_together(tmp_path, tiny_config):
    root = make_deepglobe(tmp_path, tiny_config, counts=(("train", 2),))
    config = _stats(tiny_config)
    scenes = list_scenes(config.data, "train", root)
    plain = BackboneSamples(scenes, config, length=16, seed=1, augment=False)
    augmented = BackboneSamples(scenes, config, length=16, seed=1, augment=True)
    changed = 0
    for i in range(len(plain)):
        (img, mask), (aimg, amask) = (plain[i].image, plain[i].mask), (augmented[i].image, augmented[i].mask)
        # Some flip/rotation of the plain mask is the augmented mask...
        candidates = [torch.rot90(m, k, (0, 1)) for m in (mask, mask.flip(0)) for k in range(4)]
        match = [k for k, m in enumerate(candidates) if torch.equal(m, amask)]
        assert match
        changed += not torch.equal(mask, amask)
        # ...and the image moved the same way, up to the jitter x * a + b (an affine map, so
        # the correlation stays 1). A symmetric mask matches several moves: one must fit.
        corr = []
        for k in match:
            moved = torch.rot90(img.flip(1) if k >= 4 else img, k % 4, (1, 2))
            corr.append(torch.corrcoef(torch.stack([moved.flatten(), aimg.flatten()]))[0, 1])
        assert max(corr) > 0.9999
    assert changed >= 8


def test_refiner_samples_geotiff_any_band_count(tmp_path, tiny_config):
    config = _stats(geotiff_config(tiny_config, bands=5))
    root = make_geotiff(tmp_path, config, bands=5)
    scenes = list_scenes(config.data, "train", root)
    ds = RefinerSamples(scenes, config, length=6, seed=0)
    batch = collate_refiner([ds[i] for i in range(len(ds))])
    assert batch.fine.shape == (6, 5, 32, 32) and batch.mask.shape == (6, 32, 32)
    sizes = config.pyramid.stage_sizes((96, 112))
    for scene0, size, box in zip(batch.scene0, batch.size, batch.box):
        assert tuple(scene0.shape) == (5, *sizes[0])
        assert tuple(size.tolist()) in sizes[1:]  # a finer stage, never stage 0
        top, left, h, w = box.tolist()
        assert top + h <= size[0] and left + w <= size[1]
    # The fine window is the stage image's window, the mask the stage mask's window.
    from magseg.engine.pyramid import CropBox
    from magseg.training.samples import load_scene

    one = RefinerSamples(scenes[:1], config, length=4, seed=0)
    image, mask = load_scene(scenes[0], config)
    for i in range(len(one)):
        item = one[i]
        size = tuple(item.size.tolist())
        top, left, h, w = item.box.tolist()
        box = CropBox.whole(Rect(top, left, h, w))
        # The engine's stage images: exact at this scene's non-integer factors too.
        stage = resample_window(TensorSource(image), size, Rect.of_size(size))
        assert torch.equal(item.fine, extract_crops(stage, [box], (32, 32))[0])
        assert torch.equal(item.mask[:h, :w], resize_mask(mask, size)[top : top + h, left : left + w])
        assert torch.equal(item.scene0, resample_window(TensorSource(image), sizes[0], Rect.of_size(sizes[0])))


def test_refiner_needs_two_scales(tmp_path, tiny_config):
    config = _stats(tiny_config.override({"pyramid.scales": [128]}))
    root = make_deepglobe(tmp_path, config, counts=(("train", 1),))
    with pytest.raises(Exception, match="at least two pyramid.scales"):
        RefinerSamples(list_scenes(config.data, "train", root), config, 2, 0)


# ---------------------------------------------------------------------------- bad data


def test_check_scene_names_mismatched_sizes(tmp_path, tiny_config):
    config = geotiff_config(tiny_config, bands=4)
    root = make_geotiff(tmp_path, config, counts=(("train", 1),))
    write_geotiff(root / "masks" / "s0.tif", np.zeros((1, 50, 50), dtype=np.uint8))
    scene = list_scenes(config.data, "train", root)[0]
    with pytest.raises(DataError, match=r"masks/s0.tif: mask is 50x50 but its image .*s0.tif is 112x96"):
        check_scene(scene, config)


def test_check_scene_names_corrupt_image(tmp_path, tiny_config):
    root = make_deepglobe(tmp_path, tiny_config, counts=(("train", 1),))
    (root / "0_sat.jpg").write_bytes(b"not a jpeg at all")
    scene = list_scenes(tiny_config.data, "train", root)[0]
    with pytest.raises(DataError, match="0_sat.jpg"):
        check_scene(scene, tiny_config)

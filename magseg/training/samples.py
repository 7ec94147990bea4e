"""The two phases' training samples, as torch Datasets over the scenes of a split.

Every sample is a pure function of ``(seed, phase, epoch, index)``: its scene, stage, window
and augmentation come from ``numpy.random.default_rng([seed, phase, epoch, index])``. So an
epoch holds the same samples whatever the number of DataLoader workers or ranks, and a
resumed run sees exactly the samples an uninterrupted one would. The epoch travels with the
index (``EpochSampler``), so persistent DataLoader workers, which keep their own copy of the
dataset, still sample the epoch the main process is in.

A sample reads only its window of the scene: a GeoTIFF by a windowed read, a JPEG/PNG scene
from its decoded copy in the scene cache (``magseg.data.cache``, memory-mapped), and resizes
it with the engine's ``resample_window``, reading just the source pixels the window needs:
exactly the pixels of the whole stage image cut at the window. The backbone sees it resized
to its input; at prediction the engine makes that input from the source pixels in one
filter where the stage shrinks the image by whole factors (``magseg.engine.inputs``): the
two-filter samples trained the better model (docs/training.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler, get_worker_info

from magseg.config import Config, margin_pixels
from magseg.data.cache import SceneCache
from magseg.data.scenes import IGNORE, Scene, read_scene
from magseg.engine.pyramid import CropBox, Size, context_windows, crop_windows, grown_input, grown_windows, resize
from magseg.engine.resample import ReadSource, resample_window
from magseg.errors import ConfigError, DataError, MagsegError
from magseg.geometry import Rect
from magseg.normalization import normalize
from magseg.training.augment import augment_pair, create_augmentation
from magseg.training.batches import BackboneItem, RefinerItem
from magseg.training.loader import marked
from magseg.training.windows import (
    nearest_indices,
    random_box,
    resize_mask,
)

if TYPE_CHECKING:  # coarse.py reads scenes through this module
    from magseg.training.coarse import CoarseMaps

BACKBONE, REFINER = 0, 1


def load_scene(scene: Scene, config: Config) -> tuple[Tensor, Tensor]:
    """A scene as ``(image (C, H, W) float32 normalised, mask (H, W) uint8)``."""
    data = config.data
    if data.mean is None or data.std is None:
        raise ConfigError("data.mean/data.std are not set; compute them before sampling")
    image, mask = read_scene(scene, config)
    if mask is None:
        raise ConfigError(f"{scene.image}: training needs a mask")
    return normalize(image, data.mean, data.std), torch.from_numpy(mask)


class SceneWindows:
    """One scene as samples read it: pieces of its raw image and of its mask.

    ``image(rows, cols)``: ``(C, h, w)`` raw pixels; ``mask(rows, cols)``: ``(len(rows),
    len(cols))`` class ids at those (integer array) row and column indices.
    """

    def __init__(self, image: np.ndarray, mask: np.ndarray) -> None:
        self._image, self._mask = image, mask
        self.size: Size = (int(image.shape[-2]), int(image.shape[-1]))

    def image(self, rows: slice, cols: slice) -> np.ndarray:
        # A copy: a memory-mapped entry is read-only, and torch wants writable arrays.
        return np.array(self._image[:, rows, cols])

    def mask(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return self._mask[np.ix_(rows, cols)]


class GeoTiffWindows(SceneWindows):
    """A GeoTIFF scene read by windows (only the pixels a sample needs are decoded)."""

    def __init__(self, scene: Scene, config: Config) -> None:
        from magseg.io.raster import open_raster

        self.scene, self.config = scene, config
        with open_raster(scene.image) as src:
            self.size = (src.height, src.width)

    def image(self, rows: slice, cols: slice) -> np.ndarray:
        from magseg.io.raster import read_array

        return read_array(self.scene.image, self.config.data.bands, Rect.from_slices(rows, cols))

    def mask(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        from magseg.io.raster import read_array

        r0, c0 = int(rows.min()), int(cols.min())
        window = Rect(r0, c0, int(rows.max()) + 1 - r0, int(cols.max()) + 1 - c0)
        assert self.scene.mask is not None
        mask = read_array(self.scene.mask, None, window)[0]
        path = self.scene.mask
        if not np.issubdtype(mask.dtype, np.integer):
            raise DataError(f"{path}: mask must hold integer class ids, not {mask.dtype}")
        mask = mask[np.ix_(rows - r0, cols - c0)]
        # Masks coded otherwise (data.class_map), remapped as read_mask does for whole masks.
        data = self.config.data
        if getattr(data, "class_map", None) is not None:
            from magseg.data.scenes import remap_codes

            mask = remap_codes(mask, data.class_map, data.unmapped, path)
        bad = (mask >= self.config.num_classes) & (mask != IGNORE)
        if bad.any():
            raise DataError(
                f"{path}: mask has class ids {sorted(np.unique(mask[bad]).tolist())[:10]} but "
                f"the config has {self.config.num_classes} classes "
                f"(0..{self.config.num_classes - 1}; 255 = ignore)"
            )
        return mask.astype(np.uint8)


def scene_source(scene: SceneWindows, config: Config) -> ReadSource:
    """The scene's normalised image ``(C, H, W)`` as an engine ``Source``, read piece by piece.

    Normalising each piece before resizing, as the engine resizes an image normalised
    whole: normalisation is per pixel, so a piece's values are the whole image's."""
    data = config.data
    return ReadSource(scene.size, lambda rows, cols: normalize(scene.image(rows, cols), data.mean, data.std))


def training_margin(config: Config) -> Size:
    """The context margin of training windows in stage pixels: ``train.margin`` when set,
    else ``pyramid.margin`` (what prediction grows each crop by)."""
    if config.train.margin is None:
        return config.pyramid.margin_pixels
    return margin_pixels(config.train.margin, config.pyramid.crop)


def training_window(config: Config) -> Size:
    """The window a training sample's backbone sees: the crop grown by ``training_margin``
    on both sides (the engine's window for a crop with a full margin of real pixels)."""
    (ch, cw), (my, mx) = config.pyramid.crop, training_margin(config)
    return ch + 2 * my, cw + 2 * mx


def training_input(config: Config) -> Size:
    """The backbone input of a ``training_window``: the trained magnification."""
    p = config.pyramid
    return grown_input(p.input, p.crop, training_window(config))


def stage_crop(scene: SceneWindows, size: Size, box: CropBox, config: Config,
               ratios: tuple[float, ...] = (), crop: Size | None = None) -> tuple[Tensor, list[Tensor]]:
    """The window ``box`` of the scene at the stage ``size``, normalised: the crop
    ``(C, ch, cw)`` (``crop``, default ``pyramid.crop``, zero-padded past the image) and one
    FCtL context window ``(C, r*ch, r*cw)`` per ratio, each made as ``StageRun.fine`` makes
    it (``resample_window`` of the window), from only the source pixels it needs."""
    source = scene_source(scene, config)
    (window,) = crop_windows([box], crop or config.pyramid.crop)
    contexts = [resample_window(source, size, w) for r in ratios for w in context_windows([window], r)]
    return resample_window(source, size, window), contexts


def stage_mask(scene: SceneWindows, size: Size, box: CropBox, crop: Size) -> Tensor:
    """``mask_window(resize_mask(mask, size), box, crop)`` from the mask pixels it reads."""
    rows = nearest_indices(scene.size[0], size[0])[box.window.top : box.window.bottom]
    cols = nearest_indices(scene.size[1], size[1])[box.window.left : box.window.right]
    out = torch.full(tuple(crop), IGNORE, dtype=torch.long)
    out[: box.window.height, : box.window.width] = torch.from_numpy(np.asarray(scene.mask(rows, cols)).astype(np.int64))
    return out


def open_scene(scene: Scene, config: Config, cache: SceneCache | None = None) -> SceneWindows:
    """``scene`` for reading windows: a GeoTIFF directly, a JPEG/PNG scene from ``cache``
    (decoded whole for every call without one)."""
    if config.data.mean is None or config.data.std is None:
        raise ConfigError("data.mean/data.std are not set; compute them before sampling")
    if config.data.layout == "geotiff":
        return GeoTiffWindows(scene, config)
    if cache is not None:
        return SceneWindows(*cache.load(scene))
    image, mask = read_scene(scene, config)
    if mask is None:
        raise ConfigError(f"{scene.image}: training needs a mask")
    return SceneWindows(image, mask)


def stage_image(scene: SceneWindows, size: Size, config: Config) -> Tensor:
    """The whole scene at the stage ``size``, normalised: ``(C, h, w)``, the engine's
    ``resample_window`` over the whole stage grid. Its crops are the engine's crops bit for
    bit when the stage shrinks the scene or scales it by a non-integer factor; an integer
    enlargement (a stage larger than the scene) agrees to float rounding."""
    return resample_window(scene_source(scene, config), size, Rect.of_size(size))


class _Samples(Dataset):
    phase = BACKBONE

    def __init__(self, scenes: list[Scene], config: Config, length: int, seed: int,
                 ratios: tuple[float, ...] = (), cache: SceneCache | None = None) -> None:
        if not scenes:
            raise ConfigError("no scenes to sample from")
        self.scenes = scenes
        self.config = config
        self.length = length
        self.seed = seed
        # Context ratios of a multi-context backbone (FCtL; ``backbone.context_ratios``).
        self.ratios = tuple(ratios)
        self.epoch = 0
        # Decoded JPEG/PNG scenes (None: decode the scene for every sample).
        self.cache = cache

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int | tuple[int, int]) -> BackboneItem | RefinerItem:
        try:
            return self._item(index)
        except MagsegError as exc:
            if get_worker_info() is None:
                raise
            raise marked(exc) from None  # see magseg.training.loader.batches

    def _item(self, index: int | tuple[int, int]) -> BackboneItem | RefinerItem:
        raise NotImplementedError

    def _rng(self, index: int | tuple[int, int]) -> np.random.Generator:
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        return np.random.default_rng([self.seed, self.phase, epoch, index])

    def _scene(self, rng: np.random.Generator) -> tuple[Scene, SceneWindows]:
        scene = self.scenes[int(rng.integers(len(self.scenes)))]
        return scene, open_scene(scene, self.config, self.cache)


class EpochSampler(Sampler):
    """``(epoch, index)`` for each index of ``sampler``, the epoch read from ``dataset`` when
    an epoch's iteration starts (in the main process): workers that persist across epochs
    keep their own copy of the dataset, whose ``epoch`` the main process cannot set."""

    def __init__(self, sampler: Sampler, dataset: _Samples) -> None:
        self.sampler, self.dataset = sampler, dataset

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.dataset.epoch
        return ((epoch, int(i)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


class BackboneSamples(_Samples):
    """Phase 1: a random window of a random scene at a random stage's magnification,
    resized to the backbone input and augmented: a ``BackboneItem``.
    """

    phase = BACKBONE

    def __init__(self, scenes: list[Scene], config: Config, length: int, seed: int,
                 augment: bool = True, ratios: tuple[float, ...] = (),
                 cache: SceneCache | None = None):
        super().__init__(scenes, config, length, seed, ratios, cache)
        size = config.pyramid.input
        self.augmentation = (create_augmentation(size[0] == size[1], len(self.ratios))
                             if augment else None)

    def _item(self, index: int | tuple[int, int]) -> BackboneItem:
        rng = self._rng(index)
        pyramid = self.config.pyramid
        _, scene = self._scene(rng)
        sizes = pyramid.stage_sizes(scene.size)
        size = sizes[int(rng.integers(len(sizes)))]
        # A crop with its margins (training_margin), as the engine's backbone sees it.
        window = training_window(self.config)
        box = random_box(rng, size, window)
        crop, contexts = stage_crop(scene, size, box, self.config, self.ratios, window)
        target = stage_mask(scene, size, box, window)
        # The backbone sees every crop resized to the input size (as engine.crop_probs does).
        inp = training_input(self.config)
        crop, target = resize(crop, inp), resize_mask(target, inp)
        contexts = [resize(c, inp) for c in contexts]
        if self.augmentation is not None:
            crop, target, contexts = augment_pair(self.augmentation, crop, target,
                                                  int(rng.integers(2**31)), contexts)
        return BackboneItem(crop, target, torch.stack(contexts) if contexts else None)


class RefinerSamples(_Samples):
    """Phase 2: what the refiner needs for one window of a finer stage (s >= 1).

    The backbone is not run here (it runs batched, in the training loop): an item is a
    ``RefinerItem``, the window's fine view, mask and place, and its coarse view: with
    ``coarse`` (``magseg.training.coarse.CoarseMaps``: the frozen backbone's stage-0
    probabilities of every scene, computed once per phase) its window of them; without,
    the whole scene at ``scales[0]``, for the loop to run stage 0 on.
    """

    phase = REFINER

    def __init__(self, scenes: list[Scene], config: Config, length: int, seed: int,
                 ratios: tuple[float, ...] = (), cache: SceneCache | None = None,
                 coarse: CoarseMaps | None = None) -> None:
        if len(config.pyramid.scales) < 2:
            raise ConfigError("the refiner needs at least two pyramid.scales (coarse and fine)")
        super().__init__(scenes, config, length, seed, ratios, cache)
        self.coarse = coarse

    def _item(self, index: int | tuple[int, int]) -> RefinerItem:
        rng = self._rng(index)
        pyramid = self.config.pyramid
        source, scene = self._scene(rng)
        sizes = pyramid.stage_sizes(scene.size)
        size = sizes[1 + int(rng.integers(len(sizes) - 1))]
        box = random_box(rng, size, pyramid.crop)
        # The fine view's window grown by the margin as the engine grows it (engine.pyramid.
        # grown_windows), at the training window's extent; the crop sits at ``offset`` in it.
        (grown,), ((dy, dx),), _ = grown_windows([box], pyramid.crop, size, training_margin(self.config))
        window = training_window(self.config)
        at = CropBox.whole(Rect(grown.top, grown.left, *window))
        fine, contexts = stage_crop(scene, size, at, self.config, self.ratios, window)
        return RefinerItem(
            fine=fine,
            offset=torch.tensor([dy, dx]),
            mask=stage_mask(scene, size, box, pyramid.crop),
            size=torch.tensor(size),
            box=torch.tensor([box.window.top, box.window.left, box.window.height, box.window.width]),
            coarse=None if self.coarse is None else self.coarse.window(source, size, box),
            scene0=stage_image(scene, sizes[0], self.config) if self.coarse is None else None,
            contexts=contexts or None,
        )

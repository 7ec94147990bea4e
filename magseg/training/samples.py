"""The two phases' training samples, as torch Datasets over the scenes of a split.

Every sample is a pure function of ``(seed, phase, epoch, index)``: its scene, stage, window
and augmentation come from ``numpy.random.default_rng([seed, phase, epoch, index])``. So an
epoch holds the same samples whatever the number of DataLoader workers or ranks, and a
resumed run sees exactly the samples an uninterrupted one would.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from magseg.config import Config
from magseg.data.scenes import Scene, read_scene
from magseg.errors import ConfigError
from magseg.normalization import normalize
from magseg.pyramid import resize
from magseg.training.augment import augment_pair, create_augmentation
from magseg.training.windows import image_windows, mask_window, random_box, resize_mask

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


class _Samples(Dataset):
    phase = BACKBONE

    def __init__(self, scenes: list[Scene], config: Config, length: int, seed: int,
                 ratios: tuple[float, ...] = ()) -> None:
        if not scenes:
            raise ConfigError("no scenes to sample from")
        self.scenes = scenes
        self.config = config
        self.length = length
        self.seed = seed
        # Context ratios of a multi-context backbone (FCtL; ``backbone.context_ratios``).
        self.ratios = tuple(ratios)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.phase, self.epoch, index])


class BackboneSamples(_Samples):
    """Phase 1: a random window of a random scene at a random stage's magnification,
    resized to the backbone input and augmented.

    Item: ``(image (C_in, ih, iw) float32, mask (ih, iw) int64)``, and for a multi-context
    backbone a third entry, the contexts ``(ratios, C_in, ih, iw)`` (augmented alike).
    """

    phase = BACKBONE

    def __init__(self, scenes: list[Scene], config: Config, length: int, seed: int,
                 augment: bool = True, ratios: tuple[float, ...] = ()):
        super().__init__(scenes, config, length, seed, ratios)
        size = config.pyramid.input
        self.augmentation = (create_augmentation(size[0] == size[1], len(self.ratios))
                             if augment else None)

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        rng = self._rng(index)
        pyramid = self.config.pyramid
        image, mask = load_scene(self.scenes[int(rng.integers(len(self.scenes)))], self.config)
        sizes = pyramid.stage_sizes(tuple(image.shape[-2:]))
        size = sizes[int(rng.integers(len(sizes)))]
        box = random_box(rng, size, pyramid.crop)
        crop, contexts = image_windows(resize(image, size), box, pyramid.crop, self.ratios)
        target = mask_window(resize_mask(mask, size), box, pyramid.crop)
        # The backbone sees every crop resized to the input size (as engine.crop_probs does).
        crop, target = resize(crop, pyramid.input), resize_mask(target, pyramid.input)
        contexts = [resize(c, pyramid.input) for c in contexts]
        if self.augmentation is not None:
            crop, target, contexts = augment_pair(self.augmentation, crop, target,
                                                  int(rng.integers(2**31)), contexts)
        return (crop, target, torch.stack(contexts)) if contexts else (crop, target)


class RefinerSamples(_Samples):
    """Phase 2: what the refiner needs for one window of a finer stage (s >= 1).

    The backbone is not run here (it runs batched, in the training loop); an item carries
    the scene at ``scales[0]`` (for the coarse view), the window of the stage image (for the
    fine view), the window's mask, and where the window is::

        {"scene0": (C_in, h0, w0), "fine": (C_in, ch, cw), "mask": (ch, cw) int64,
         "size": (2,) stage size, "box": (4,) top, left, height, width,
         "contexts": [(C_in, r*ch, r*cw) per ratio]}   # multi-context backbones only
    """

    phase = REFINER

    def __init__(self, scenes: list[Scene], config: Config, length: int, seed: int,
                 ratios: tuple[float, ...] = ()) -> None:
        if len(config.pyramid.scales) < 2:
            raise ConfigError("the refiner needs at least two pyramid.scales (coarse and fine)")
        super().__init__(scenes, config, length, seed, ratios)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        rng = self._rng(index)
        pyramid = self.config.pyramid
        image, mask = load_scene(self.scenes[int(rng.integers(len(self.scenes)))], self.config)
        sizes = pyramid.stage_sizes(tuple(image.shape[-2:]))
        size = sizes[1 + int(rng.integers(len(sizes) - 1))]
        box = random_box(rng, size, pyramid.crop)
        fine, contexts = image_windows(resize(image, size), box, pyramid.crop, self.ratios)
        item = {
            "scene0": resize(image, sizes[0]),
            "fine": fine,
            "mask": mask_window(resize_mask(mask, size), box, pyramid.crop),
            "size": torch.tensor(size),
            "box": torch.tensor([box.top, box.left, box.height, box.width]),
        }
        if contexts:
            item["contexts"] = contexts
        return item


def collate_refiner(items: list[dict[str, Tensor]]) -> dict[str, Any]:
    """Stack what has one shape; keep ``scene0`` (sizes differ between scenes) as a list."""
    out: dict[str, Any] = {"scene0": [item["scene0"] for item in items]}
    for key in ("fine", "mask", "size", "box"):
        out[key] = torch.stack([item[key] for item in items])
    if "contexts" in items[0]:  # one batch per ratio
        out["contexts"] = [torch.stack(group) for group in zip(*(item["contexts"] for item in items))]
    return out

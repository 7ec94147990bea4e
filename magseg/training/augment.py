"""Augmentations for backbone training (albumentations), applied to image and mask together.

They run on the *normalised* float image, so they work for any band count and any raw dtype
(uint8, uint16, float): flips, 90-degree rotations (square inputs only, so the shape the
model sees never changes) and a light brightness/contrast jitter in units of the channels'
standard deviation. albumentations' own colour transforms assume RGB values in [0, 1] or
[0, 255] and would clip normalised data.
"""

from __future__ import annotations

import albumentations as A
import numpy as np
import torch
from torch import Tensor


class NormalizedJitter(A.ImageOnlyTransform):
    """``x * a + b`` with ``a ~ U(1 - contrast, 1 + contrast)``, ``b ~ U(-brightness,
    brightness)``: brightness/contrast jitter for zero-mean, unit-std images of any band count."""

    def __init__(self, brightness: float = 0.1, contrast: float = 0.1, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.brightness = brightness
        self.contrast = contrast

    def get_params(self) -> dict[str, float]:
        return {
            "alpha": self.py_random.uniform(1 - self.contrast, 1 + self.contrast),
            "beta": self.py_random.uniform(-self.brightness, self.brightness),
        }

    def apply(self, img: np.ndarray, alpha: float, beta: float, **params) -> np.ndarray:
        return (img * alpha + beta).astype(np.float32)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness", "contrast")


def create_augmentation(square: bool, contexts: int = 0) -> A.Compose:
    """The training augmentation; ``square``: whether the input is square (allows rot90);
    ``contexts``: how many context images (FCtL) take the same transform as the image."""
    transforms: list[A.BasicTransform] = [A.HorizontalFlip(), A.VerticalFlip()]
    if square:
        transforms.append(A.RandomRotate90())
    transforms.append(NormalizedJitter())
    return A.Compose(transforms, additional_targets={f"context{i}": "image" for i in range(contexts)})


def augment_pair(
    augmentation: A.Compose, image: Tensor, mask: Tensor, seed: int, contexts: list[Tensor] = ()
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Apply ``augmentation`` with its random choices fixed by ``seed``.

    Args:
        image: ``(C, H, W)`` float32 normalised; mask: ``(H, W)`` int64 labels;
        contexts: ``(C, H, W)`` context images, transformed exactly as ``image``.
    """
    def hwc(x: Tensor) -> np.ndarray:
        return np.ascontiguousarray(x.permute(1, 2, 0).numpy())

    def chw(x: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).contiguous()

    augmentation.set_random_seed(seed)
    extra = {f"context{i}": hwc(c) for i, c in enumerate(contexts)}
    out = augmentation(image=hwc(image), mask=mask.numpy().astype(np.uint8), **extra)
    moved = [chw(out[f"context{i}"]) for i in range(len(contexts))]
    return chw(out["image"]), torch.from_numpy(np.ascontiguousarray(out["mask"])).long(), moved

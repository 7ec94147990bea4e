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


def create_augmentation(square: bool) -> A.Compose:
    """The training augmentation; ``square``: whether the input is square (allows rot90)."""
    transforms: list[A.BasicTransform] = [A.HorizontalFlip(), A.VerticalFlip()]
    if square:
        transforms.append(A.RandomRotate90())
    transforms.append(NormalizedJitter())
    return A.Compose(transforms)


def augment_pair(augmentation: A.Compose, image: Tensor, mask: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """Apply ``augmentation`` with its random choices fixed by ``seed``.

    Args:
        image: ``(C, H, W)`` float32 normalised; mask: ``(H, W)`` int64 labels.
    """
    augmentation.set_random_seed(seed)
    out = augmentation(
        image=np.ascontiguousarray(image.permute(1, 2, 0).numpy()),
        mask=mask.numpy().astype(np.uint8),
    )
    img = torch.from_numpy(np.ascontiguousarray(out["image"])).permute(2, 0, 1).contiguous()
    return img, torch.from_numpy(np.ascontiguousarray(out["mask"])).long()

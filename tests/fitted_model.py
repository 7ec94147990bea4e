"""A tiny backbone fitted in a few seconds to a colour rule, for tests that need predictions
that depend on the image (a fresh model predicts one class almost everywhere, which would
let misplaced windows or transposed arrays go unnoticed).

The rule: class 0 where every band is below 110 (dark), else 1 + the brightest band. The
model is the tiny config's Unet, so it also uses context (its convolutions see neighbours),
unlike the rule itself.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from geotiff import smooth_image

from magseg.config import Config
from magseg.normalization import normalize
from magseg.segmenter import create_segmenter_model


def colour_rule(image: np.ndarray) -> np.ndarray:
    """Class ids ``(H, W)`` of a ``(3, H, W)`` image by the rule above."""
    return np.where(image.max(0) < 110, 0, 1 + image.argmax(0)).astype(np.int64)


def fit_backbone(config: Config, steps: int = 150, size: int = 32, seed: int = 0) -> torch.nn.Module:
    """Train the config's backbone (3 bands, 4 classes) on ``size`` px samples of smooth
    random images labelled by ``colour_rule``; returns it in eval mode (about 5 s on 2 cores)."""
    assert config.num_classes == 4 and config.model.in_channels == 3
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = create_segmenter_model(config, pretrained=False)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for step in range(steps):
        images = [smooth_image(3, size, size, seed=int(rng.integers(1 << 30))) for _ in range(16)]
        x = torch.stack([normalize(i, config.data.mean, config.data.std) for i in images])
        y = torch.from_numpy(np.stack([colour_rule(i) for i in images]))
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()

"""A CRF over the final probabilities, guided by the image: DeepLab's post-processing.

The model (Krähenbühl and Koltun 2011, as DeepLab v1/v2 use it): a Potts CRF whose unary is
``-log p`` of the engine's probabilities and whose pairwise term between pixels i and j is

    w_g k_g(i, j) + w_b k_b(i, j),   k_g = exp(-|p_i - p_j|² / 2 sxy_g²)
                                     k_b = exp(-|p_i - p_j|² / 2 sxy_b² - |I_i - I_j|² / 2 srgb²)

(positions p, pixel values I). Mean-field inference, ``iterations`` times:

    Q <- softmax(log p + w_g N_g(Q) + w_b N_b(Q)),   N(Q)_i = sum_j k(i, j) Q_j / sum_j k(i, j)

with each kernel normalised per pixel (the messages are weighted means of the neighbours'
Q, in [0, 1], as densecrf's normalised kernels make them), j over the other pixels.

Two ways to sum over j:

- ``local_crf`` (the default, pure torch, any device, batched): j within a ``window`` x
  ``window`` square around i, as ConvCRF does. After n iterations a pixel depends only on
  the input within ``n * (window // 2)`` pixels (``reach``), so tiles cut with that margin
  give exactly the result of the whole image;
- ``dense_crf`` (``pydensecrf2``, the ``magseg[densecrf]`` extra): every j of the tile,
  through the permutohedral lattice; its reach is the whole tile, so it depends on the tiles.

``CrfSink`` runs either over a whole image or raster: the final probabilities go to a map
(memory, or chunks on disk for predict), then tile by tile, each with the margin, through the
CRF into the real sink. ``segment`` and predict cut the same tiles, so a raster streamed from
disk gets the in-memory result.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from magseg.config import CrfConfig
from magseg.engine.pyramid import CropBox, crop_boxes
from magseg.engine.refine_step import labels_of
from magseg.errors import ConfigError
from magseg.geometry import Rect

# Probabilities are clipped here before the log (pydensecrf's unary_from_softmax clips at 1e-5).
EPS = 1e-5
# The side of the CRF pass's tiles (plus the margin each side): large enough that the margin
# adds little (30 px of 512), small enough that the local kernels stay in memory
# ((window² - 1) weights per pixel: 48 x 572² floats, 63 MB).
TILE = 512


def reach(cfg: CrfConfig) -> int:
    """Pixels from which the local CRF's result can be influenced: iterations x window radius."""
    return cfg.iterations * (cfg.window // 2)


def _offsets(radius: int) -> list[tuple[int, int]]:
    return [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
            if (dy, dx) != (0, 0)]


def _shifted(padded: Tensor, radius: int, dy: int, dx: int, size: tuple[int, int]) -> Tensor:
    """The neighbour at ``(dy, dx)`` of every pixel, from a tensor zero-padded by ``radius``."""
    h, w = size
    return padded[..., radius + dy : radius + dy + h, radius + dx : radius + dx + w]


def local_kernels(guide: Tensor, cfg: CrfConfig) -> Tensor:
    """The normalised, weighted kernels of every pixel to its window's other pixels.

    Args:
        guide: ``(B, G, H, W)`` pixel values (any bands) in the units of ``bilateral_srgb``.
    Returns:
        ``(B, K, H, W)``, ``K = window² - 1``: ``w_g k_g / sum k_g + w_b k_b / sum k_b`` for
        each offset; 0 where the neighbour is outside the image.
    """
    radius = cfg.window // 2
    b, bands, h, w = guide.shape
    pad = (radius, radius, radius, radius)
    guide = guide.float()
    padded = torch.nn.functional.pad(guide, pad)
    inside = torch.nn.functional.pad(guide.new_ones((b, h, w)), pad)
    offsets = _offsets(radius)
    gauss = guide.new_empty((b, len(offsets), h, w))
    bilateral = torch.empty_like(gauss)
    half = len(offsets) // 2  # offsets[-1 - k] is -offsets[k]
    for k, (dy, dx) in enumerate(offsets):
        d2 = float(dy * dy + dx * dx)
        there = _shifted(inside, radius, dy, dx, (h, w))
        torch.mul(there, float(np.exp(-d2 / (2 * cfg.gaussian_sxy ** 2))), out=gauss[:, k])
        dist = bilateral[:, k]
        if k >= half:
            # The kernel is symmetric: pixel i's weight at offset o is that of i + o at -o,
            # already computed (bit for bit: (a - b)² is (b - a)²).
            mirror = torch.nn.functional.pad(bilateral[:, len(offsets) - 1 - k], pad)
            dist.copy_(_shifted(mirror, radius, dy, dx, (h, w)))
            continue
        # Squared pixel-value distance, band by band into one buffer (no (B, G, H, W) temporaries).
        dist.zero_()
        for band in range(bands):
            diff = guide[:, band] - _shifted(padded[:, band], radius, dy, dx, (h, w))
            dist.addcmul_(diff, diff)
        dist.mul_(-0.5 / cfg.bilateral_srgb ** 2).sub_(d2 / (2 * cfg.bilateral_sxy ** 2)).exp_().mul_(there)
    # A pixel whose neighbours all differ beyond float range gets no bilateral message (0/tiny).
    gauss.mul_(cfg.gaussian_compat / gauss.sum(1, keepdim=True).clamp_min(1e-30))
    bilateral.mul_(cfg.bilateral_compat / bilateral.sum(1, keepdim=True).clamp_min(1e-30))
    return gauss.add_(bilateral)


def local_crf(probs: Tensor, guide: Tensor, cfg: CrfConfig) -> Tensor:
    """Mean-field inference of the local CRF.

    Args:
        probs: ``(B, C, H, W)`` probabilities (the unary is their log).
        guide: ``(B, G, H, W)`` pixel values, in the units of ``cfg.bilateral_srgb``.
    Returns:
        ``(B, C, H, W)`` float32 marginals Q after ``cfg.iterations`` updates.
    """
    radius = cfg.window // 2
    size = tuple(probs.shape[-2:])
    unary = probs.float().clamp_min(EPS).log()
    kernels = local_kernels(guide.to(probs.device), cfg)
    pad = (radius, radius, radius, radius)
    q = unary.softmax(1)
    for _ in range(cfg.iterations):
        padded = torch.nn.functional.pad(q, pad)
        logits = unary.clone()
        for k, (dy, dx) in enumerate(_offsets(radius)):
            logits.addcmul_(kernels[:, k : k + 1], _shifted(padded, radius, dy, dx, size))
        q = logits.softmax(1)
    return q


def dense_crf(probs: Tensor, guide: Tensor, cfg: CrfConfig) -> Tensor:
    """The fully connected CRF of pydensecrf2 over each image of the batch (CPU, float32);
    the same model and parameters as ``local_crf``, with j over the whole image.

    Raises:
        ConfigError: pydensecrf2 is not installed.
    """
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import create_pairwise_bilateral, create_pairwise_gaussian
    except ImportError:
        raise ConfigError("refine.crf.method=dense needs pydensecrf2: pip install 'magseg[densecrf]' "
                          "(it builds with a C++ compiler), or use refine.crf.method=local") from None
    out = []
    for p, g in zip(probs.float().cpu().numpy(), guide.float().cpu().numpy()):
        classes, h, w = p.shape
        crf = dcrf.DenseCRF2D(w, h, classes)
        crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(p, EPS, None)).reshape(classes, -1)))
        crf.addPairwiseEnergy(create_pairwise_gaussian((cfg.gaussian_sxy,) * 2, (h, w)),
                              compat=cfg.gaussian_compat)
        crf.addPairwiseEnergy(create_pairwise_bilateral((cfg.bilateral_sxy,) * 2, (cfg.bilateral_srgb,) * len(g),
                                                        np.ascontiguousarray(g), chdim=0),
                              compat=cfg.bilateral_compat)
        out.append(np.asarray(crf.inference(cfg.iterations), np.float32).reshape(classes, h, w))
    return torch.from_numpy(np.stack(out)).to(probs.device)


def run_crf(probs: Tensor, guide: Tensor, cfg: CrfConfig) -> Tensor:
    """``cfg.method``'s CRF: ``(B, C, H, W)`` probabilities and ``(B, G, H, W)`` guide ->
    ``(B, C, H, W)`` marginals."""
    return dense_crf(probs, guide, cfg) if cfg.method == "dense" else local_crf(probs, guide, cfg)


def check_crf(cfg: CrfConfig) -> None:
    """Raise ``ConfigError`` before any work if ``cfg`` asks for a CRF this install lacks."""
    if cfg.enabled and cfg.method == "dense":
        try:
            import pydensecrf.densecrf  # noqa: F401
        except ImportError:
            dense_crf(torch.zeros((0, 1, 1, 1)), torch.zeros((0, 1, 1, 1)), cfg)


class CrfSink:
    """A ``magseg.engine.stages.Sink`` that puts the CRF between the engine and ``inner``.

    The engine's final probabilities go to ``probs`` (a stage map at the image size:
    ``MemoryMap`` or ``ChunkMap``); ``finish`` then cuts the image into ``TILE`` tiles, reads
    each with a margin of ``reach(cfg)`` pixels (clipped at the image's edge) from the map
    and from ``image``, runs the CRF and writes the tile's own pixels to ``inner``.

    Args:
        image: the normalised image as a ``Source`` (``(C_in, h, w)`` windows).
        scale: per band, what turns the normalised values back into pixel units (the
            normalisation's std; the mean cancels in the bilateral kernel's differences);
            None: the normalised values as they are.
    """

    wants_probs = True

    def __init__(self, inner, image, probs, cfg: CrfConfig, scale: Sequence[float] | None,
                 device: torch.device | str = "cpu") -> None:
        self.inner, self.image, self.probs, self.cfg = inner, image, probs, cfg
        self.device = torch.device(device)
        self.scale = None if scale is None else torch.tensor(list(scale), dtype=torch.float32).view(-1, 1, 1)

    def write(self, boxes: list[CropBox], labels: Tensor, probs: Tensor | None) -> None:
        self.probs.write(boxes, probs)

    @property
    def labels(self) -> Tensor:
        """``(1, H, W)`` labels before the CRF (the engine's last stage, for its trace; maps
        in memory only)."""
        return labels_of(self.probs.tensor)[None]

    def guide(self, rows: slice, cols: slice) -> Tensor:
        """``(G, h, w)`` pixel values of a window, in the units of ``bilateral_srgb``."""
        x = self.image.read(rows, cols).float()
        return x if self.scale is None else x * self.scale.to(x.device)

    def finish(self) -> None:
        """The CRF over every tile, into ``inner``; the probability map is discarded."""
        size = self.probs.size
        margin = reach(self.cfg)
        for box in crop_boxes(size, (TILE, TILE)):
            read = box.owned.grown(margin).intersection(Rect.of_size(size))
            q = run_crf(self.probs.read(*read.slices)[None].to(self.device),
                        self.guide(*read.slices)[None].to(self.device), self.cfg)
            own = q[(slice(None), slice(None), *box.owned.within(read))]
            # The tile's owned region is what the CRF pass writes: a crop of just that.
            self.inner.write([CropBox.whole(box.owned)], labels_of(own),
                             own if self.inner.wants_probs else None)
        self.probs.discard()

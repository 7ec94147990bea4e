"""Per-pixel certainty and MagNet's error map.

certainty(P) = top-1 minus top-2 probability, in [0, 1]: 1 where one class has all the mass,
0 where the two best classes tie. The error map

    Q = median_blur(certainty(R) * (1 - certainty(Y)), k)

is high where the coarse prediction Y is unsure and the refined prediction R is sure; the
median blur makes isolated pixels lose to coherent regions.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
from torch import Tensor

# The blurred map is quantised to 1/255 steps (see median_blur); its ranks are broken by the
# raw score scaled by this factor, which stays below half a quantisation step.
_TIE_BREAK = 1e-3


def certainty(probs: Tensor) -> Tensor:
    """Top-1 minus top-2 probability.

    Args:
        probs: ``(B, C, H, W)`` probabilities over ``C >= 2`` classes.
    Returns:
        ``(B, H, W)`` in [0, 1].
    """
    if probs.shape[1] < 2:
        raise ValueError(f"certainty needs at least 2 classes, got {probs.shape[1]}")
    # A running top-2 over the channels, in place: five times faster on a CPU than topk(2)
    # over the channel dimension, and a tie at the top (e.g. all-zero padding) gives
    # best == second, certainty 0, by construction.
    best = probs[:, 0].clone()
    second = torch.full_like(best, float("-inf"))
    low = torch.empty_like(best)
    for c in range(1, probs.shape[1]):
        value = probs[:, c]
        torch.minimum(best, value, out=low)
        torch.maximum(second, low, out=second)
        torch.maximum(best, value, out=best)
    return best.sub_(second)


def median_blur(x: Tensor, kernel: int) -> Tensor:
    """Median filter of ``x`` (B, H, W) with values in [0, 1], edges replicated.

    Runs OpenCV's constant-time histogram median on ``x`` quantised to 8 bits: that is exact
    up to the quantisation (the median commutes with any monotone map, rounding included)
    and, unlike unfolding k*k neighbours, costs the same for k = 3 or 11.

    Returns:
        ``(B, H, W)``, values on the 1/255 grid, same dtype and device as ``x``.
    """
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"median kernel must be odd and >= 1, got {kernel}")
    q = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    if kernel > 1:
        # OpenCV's median is single-threaded and releases the GIL: blur the maps side by side.
        blur = lambda m: cv2.medianBlur(np.ascontiguousarray(m), kernel)  # noqa: E731
        q = np.stack(list(_blur_pool().map(blur, q)) if len(q) > 1 else [blur(q[0])])
    return torch.from_numpy(q).to(device=x.device, dtype=x.dtype) / 255


@functools.lru_cache(maxsize=1)
def _blur_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="magseg-blur")


def error_map(refined: Tensor, coarse: Tensor, kernel: int) -> Tensor:
    """MagNet's refinement score: high where the coarse view is unsure and the refined sure.

    Args:
        refined: ``(B, C, H, W)`` refined probabilities R.
        coarse: ``(B, C, H, W)`` coarse probabilities Y (the previous stage, upsampled).
        kernel: median blur size (odd; 1 = none).
    Returns:
        ``(B, H, W)`` score ``median_blur(cert(R) * (1 - cert(Y)))`` plus a tie-break of the
        unblurred score far below one quantisation step, so that ranking by it ranks by the
        blurred map first and, inside a plateau of the blurred map, by the raw score.
    """
    raw = certainty(refined) * (1 - certainty(coarse))
    if kernel == 1:
        return raw
    return median_blur(raw, kernel) + _TIE_BREAK * raw

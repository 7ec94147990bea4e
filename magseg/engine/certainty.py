"""Per-pixel certainty and MagNet's error map.

certainty(P) = top-1 minus top-2 probability, in [0, 1]: 1 where one class has all the mass,
0 where the two best classes tie. The error map

    Q = median_blur(certainty(R) * (1 - certainty(Y)), k)

is high where the coarse prediction Y is unsure and the refined prediction R is sure; the
median blur makes isolated pixels lose to coherent regions. The engine only needs the top-K
pixels of Q, and ``top_error_pixels`` finds them without making Q.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from magseg.engine.opencv import each_map

# The blurred map is quantised to 1/255 steps (see median_blur); its ranks are broken by the
# raw score scaled by this factor, which stays below half a quantisation step.
_TIE_BREAK = 1e-3


def top2(probs: Tensor) -> tuple[Tensor, Tensor]:
    """The largest and second-largest value over the channels of each pixel.

    Args:
        probs: ``(B, C, H, W)``, ``C >= 2``.
    Returns:
        ``(best, second)``, each ``(B, H, W)``; ``best == second`` where the top is a tie.
    """
    if probs.shape[1] < 2:
        raise ValueError(f"certainty needs at least 2 classes, got {probs.shape[1]}")
    # A running top-2 over the channels, in place: a few elementwise passes over (B, H, W)
    # buffers, cheaper on a CPU than topk(2) along the channel dimension
    # (docs/refiner.md#what-the-gate-costs-the-engine); and a tie at the top (e.g. all-zero
    # padding) gives best == second, certainty 0, by construction.
    best = torch.maximum(probs[:, 0], probs[:, 1])
    second = torch.minimum(probs[:, 0], probs[:, 1])
    low = torch.empty_like(best)
    for c in range(2, probs.shape[1]):
        value = probs[:, c]
        torch.minimum(best, value, out=low)
        torch.maximum(second, low, out=second)
        torch.maximum(best, value, out=best)
    return best, second


def certainty(probs: Tensor) -> Tensor:
    """Top-1 minus top-2 probability.

    Args:
        probs: ``(B, C, H, W)`` probabilities over ``C >= 2`` classes.
    Returns:
        ``(B, H, W)`` in [0, 1].
    """
    best, second = top2(probs)
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
        q = np.stack(each_map(lambda b: cv2.medianBlur(np.ascontiguousarray(q[b]), kernel), len(q)))
    return torch.from_numpy(q).to(device=x.device, dtype=x.dtype) / 255


def error_score(refined: Tensor, coarse: Tensor, total: Tensor | None = None) -> Tensor:
    """The unblurred error score ``cert(R) * (1 - cert(Y))``: ``(B, C, H, W)`` x 2 ->
    ``(B, H, W)`` in [0, 1].

    ``total``: ``(B, H, W)``, when ``refined`` holds R up to a per-pixel factor, ``R =
    refined / total`` (the engine's refiner weights, ``Refiner.weights``): the certainty of
    R is then that of ``refined`` over ``total``, one division of one channel instead of C.
    """
    return error_score_and_tops(refined, coarse, total)[0]


def error_score_and_tops(refined: Tensor, coarse: Tensor, total: Tensor | None = None
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """``error_score`` and the top-1 maps ``(B, H, W)`` of ``refined`` and of ``coarse`` it
    found on the way, for argmaxes that reuse them (``magseg.engine.refine_step.labels_of``)."""
    best, cert = top2(refined)
    torch.sub(best, cert, out=cert)
    if total is not None:  # a total of 0 (every weight underflowed): certainty 0, not NaN
        cert.div_(total.clamp_min(torch.finfo(total.dtype).tiny))
    coarse_best, unsure = top2(coarse)
    torch.sub(unsure, coarse_best, out=unsure).add_(1)
    return cert.mul_(unsure), best, coarse_best


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
    raw = error_score(refined, coarse)
    if kernel == 1:
        return raw
    return median_blur(raw, kernel) + _TIE_BREAK * raw


def top_error_pixels(raw: Tensor, kernel: int, ks: Sequence[int], allowed: Tensor | None = None,
                     method: Literal["auto", "opencv", "torch"] = "auto") -> Tensor:
    """The K pixels of each map with the highest error map, found without making the map.

    Map b gets the ``ks[b]`` allowed pixels of highest ``median_blur(raw, kernel)``, ties
    broken by ``raw``: the top-K of ``error_map``. (Exactly so: ``error_map``'s float sum
    merges raw scores closer than about 6e-5, this compares them as they are.)

    The median of a k x k window is >= t exactly when more than k*k/2 of its values are >= t.
    So the number of pixels whose blurred level is >= t is a box filter (a running count) of
    the map thresholded at t, and bisection over the 256 levels finds T, the level of the K-th
    pixel, in 8 counts. A count is one box filter over a thresholded map, much cheaper than
    a median filter of the map, and no top-K over the whole map follows: every pixel above T
    is picked, and the rest of K are the pixels at T with the highest raw score.

    Args:
        raw: ``(B, H, W)`` unblurred score in [0, 1] (``error_score``).
        kernel: median blur size (odd; 1 = none).
        ks: K of each map, at most its number of allowed pixels.
        allowed: ``(B, H, W)`` bool, the pixels that may be picked (the median still reads
            the others); None allows all.
        method: ``opencv`` counts on the host, one map per thread (the fastest on a CPU);
            ``torch`` counts all maps at once on ``raw``'s device (``avg_pool2d``), with no
            host round-trip (the one for a GPU); ``auto`` picks by ``raw``'s device. Both
            pick the same pixels.
    Returns:
        ``(B, H, W)`` bool, True on the picked pixels, on ``raw``'s device.
    """
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"median kernel must be odd and >= 1, got {kernel}")
    if len(ks) != raw.shape[0]:
        raise ValueError(f"{len(ks)} values of K for {raw.shape[0]} maps")
    if method == "torch" or (method == "auto" and raw.device.type != "cpu"):
        return _top_error_pixels_torch(raw, kernel, ks, allowed)
    scores = raw.detach().float().cpu().contiguous().numpy()
    masks = None if allowed is None else allowed.cpu().contiguous().numpy().view(np.uint8) * np.uint8(255)
    out = np.zeros(scores.shape, np.uint8)

    def pick(b: int) -> None:
        _pick_map(scores[b], ks[b], kernel, None if masks is None else masks[b], out[b])

    each_map(pick, len(ks))
    return torch.from_numpy(out).view(torch.bool).to(raw.device)


def _top_error_pixels_torch(raw: Tensor, kernel: int, ks: Sequence[int], allowed: Tensor | None) -> Tensor:
    """``top_error_pixels`` in torch, every map of the batch bisected at once: the same
    levels (float32 ``round``, ties to even, as OpenCV's), the same counts (a box filter of
    the thresholded map, edges replicated), the same ties broken by ``raw``."""
    maps, height, width = raw.shape
    raw = raw.detach().float()
    k = torch.as_tensor(list(ks), device=raw.device).view(maps, 1, 1)
    everywhere = torch.ones_like(raw, dtype=torch.bool) if allowed is None else allowed.to(torch.bool)
    levels = (raw * 255).round_().clamp_(0, 255)
    pad, majority = kernel // 2, kernel * kernel // 2

    def blurred_at_least(t: Tensor) -> Tensor:
        at_least = (levels >= t).to(torch.float32)[:, None]
        if kernel > 1:
            # avg_pool2d * k^2 is the count up to float rounding; counts are integers.
            at_least = F.pad(at_least, (pad, pad, pad, pad), mode="replicate")
            at_least = F.avg_pool2d(at_least, kernel, stride=1).mul_(kernel * kernel).round_()
        return (at_least[:, 0] > majority) & everywhere

    # The invariant of _pick_map, per map: at least k pixels reach level lo, fewer than k hi.
    lo, hi = torch.zeros_like(k), torch.full_like(k, 256)
    lo_mask, hi_mask = everywhere, torch.zeros_like(everywhere)
    for _ in range(8):  # 256 levels
        mid = (lo + hi) // 2
        mask = blurred_at_least(mid)
        enough = mask.sum(dim=(1, 2), keepdim=True) >= k
        lo, lo_mask = torch.where(enough, mid, lo), torch.where(enough, mask, lo_mask)
        hi, hi_mask = torch.where(enough, hi, mid), torch.where(enough, hi_mask, mask)
    # Every pixel above level lo, then the pixels at lo with the highest raw score.
    ties = (lo_mask & ~hi_mask).flatten(1)
    need = (k.flatten() - hi_mask.flatten(1).sum(dim=1)).view(maps, 1)
    order = raw.flatten(1).masked_fill(~ties, -1.0).argsort(dim=1, descending=True, stable=True)
    first = torch.arange(height * width, device=raw.device).expand(maps, -1) < need
    picked = hi_mask.flatten(1) | torch.zeros_like(ties).scatter_(1, order, first)
    picked = picked.view(maps, height, width)
    everything = k >= everywhere.sum(dim=(1, 2), keepdim=True)
    return torch.where(everything, everywhere, picked) & (k > 0)


def _levels(raw: np.ndarray) -> np.ndarray:
    """median_blur's 8-bit levels of scores in [0, 1]: ``round(raw * 255)``, saturated, both
    computed in float32 with ties to even (the abs of ``convertScaleAbs`` is a no-op on
    scores >= 0)."""
    return cv2.convertScaleAbs(raw, alpha=255)


def _kth_level(levels: np.ndarray, k: int, allowed: np.ndarray | None) -> int:
    """The level of the k-th highest allowed pixel of ``levels`` (uint8): the largest t with
    at least k allowed pixels at t or above."""
    counts = cv2.calcHist([levels], [0], allowed, [256], [0, 256]).ravel()
    at_least = np.cumsum(counts[::-1])[::-1]  # at_least[t]: pixels at level t or above
    return int(np.flatnonzero(at_least >= k)[-1])


def _pick_map(raw: np.ndarray, k: int, kernel: int, allowed: np.ndarray | None, out: np.ndarray) -> None:
    """``top_error_pixels`` for one ``(H, W)`` float32 map; ``allowed`` is 0/255 uint8 or
    None. Writes 1 on the picked pixels into ``out`` (zeros, uint8)."""
    if k <= 0:
        return
    everywhere = np.full(raw.shape, 255, np.uint8) if allowed is None else allowed
    if k >= cv2.countNonZero(everywhere):
        np.minimum(everywhere, 1, out=out)
        return
    levels = _levels(raw)
    majority = kernel * kernel // 2
    depth = cv2.CV_8U if kernel * kernel <= 255 else cv2.CV_32S

    def blurred_at_least(t: int) -> np.ndarray:
        """255 where the median of the pixel's window is >= t (and it is allowed), else 0."""
        _, at_least = cv2.threshold(levels, t - 1, 1, cv2.THRESH_BINARY)  # 1 where level >= t
        # cv2.medianBlur replicates the edges; the count must see the same windows.
        count = cv2.boxFilter(at_least, depth, (kernel, kernel), normalize=False,
                              borderType=cv2.BORDER_REPLICATE)
        mask = cv2.compare(count, majority, cv2.CMP_GT)
        return mask if allowed is None else cv2.bitwise_and(mask, allowed)

    # Invariant: at least k pixels reach level lo (level 0: every pixel), fewer than k reach hi.
    lo, lo_mask, hi, hi_mask = 0, everywhere, 256, np.zeros_like(everywhere)
    # The blurred map's K-th level is near the raw map's (a median keeps a smooth map's
    # levels): bracket it there first, widening until the invariant holds, then bisect. Any
    # bracket that keeps the invariant ends on the same level, so the picks are those of
    # the whole bisection, in about half its counts.
    guess = _kth_level(levels, k, allowed)
    for width in (4, 16):
        low, high = max(guess - width, 0), min(guess + width, 255) + 1
        if low > lo:
            mask = blurred_at_least(low)
            if cv2.countNonZero(mask) < k:
                hi, hi_mask = low, mask
                continue
            lo, lo_mask = low, mask
        if high < hi:
            mask = blurred_at_least(high)
            if cv2.countNonZero(mask) >= k:
                lo, lo_mask = high, mask
                continue
            hi, hi_mask = high, mask
        break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        mask = blurred_at_least(mid)
        if cv2.countNonZero(mask) >= k:
            lo, lo_mask = mid, mask
        else:
            hi, hi_mask = mid, mask
    np.minimum(hi_mask, 1, out=out)  # every pixel above level lo
    ties = np.flatnonzero(cv2.compare(lo_mask, hi_mask, cv2.CMP_GT))  # the pixels at level lo
    need = k - cv2.countNonZero(hi_mask)
    if need < ties.size:
        ties = ties[np.argpartition(raw.ravel()[ties], ties.size - need)[ties.size - need :]]
    out.ravel()[ties] = 1

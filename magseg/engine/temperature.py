"""A checkpoint's temperature applied to probabilities: ``softmax(log(p) / T)``.

Fitted on validation after training (``magseg.evaluation.calibration.fit_temperature``) and
stored in the checkpoint; applied to the probabilities and uncertainty a segmenter outputs,
never to its labels (dividing every log-probability of a pixel by one T > 0 keeps its argmax).
"""

from __future__ import annotations

import torch
from torch import Tensor


def apply_temperature(probs: Tensor, temperature: float, dim: int = -3) -> Tensor:
    """``probs`` re-tempered: ``softmax(log(probs) / T)`` along the class ``dim``.

    Args:
        probs: ``(..., C, H, W)`` (``dim=-3``) or ``(N, C)`` (``dim=-1``) probabilities.
    Returns:
        float32 of the same shape; ``probs`` itself when ``T`` is 1.
    """
    if temperature == 1.0:
        return probs
    # log(0) = -inf stays -inf: a class with probability 0 keeps it. A pixel of all zeros
    # (nodata) would give NaN; it stays all zeros.
    logp = probs.float().clamp_min(0).log() / temperature
    out = logp.softmax(dim=dim)
    return torch.nan_to_num(out, nan=0.0)

"""Calibration: how far a model's confidence is from its accuracy, and the temperature that
brings them together.

- ``ReliabilityBins``: per-pixel confidence (top-1 probability) against correctness, counted
  in 15 equal-width bins; sums, so scenes, ranks and Ray workers add up exactly.
- ``ece``: the expected calibration error of those bins (Guo et al. 2017): the pixel-weighted
  mean over bins of ``|accuracy - mean confidence|``.
- ``apply_temperature``: probabilities as a softmax of logits divided by ``T``. The engine
  keeps probabilities, not logits; ``softmax(log p / T)`` equals ``softmax(z / T)`` for any
  logits ``z`` with ``softmax(z) = p`` (the per-pixel log-sum-exp cancels), so the
  temperature applies to any stage's probabilities. ``T`` > 0 keeps each pixel's order of
  classes, so labels never change (they are taken before it anyway).
- ``fit_temperature``: the ``T`` minimising the negative log-likelihood of labelled pixels,
  by golden-section search over ``log T`` (the NLL is convex in ``1 / T``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from magseg.engine.temperature import apply_temperature  # noqa: F401  (re-exported)

BINS = 15
# Where the search for T looks: wider than any temperature seen in practice (0.7-3).
LOG_T_RANGE = (math.log(0.05), math.log(20.0))


@dataclass
class ReliabilityBins:
    """Confidence against accuracy over labelled pixels, in ``bins`` equal-width bins of the
    top-1 probability. ``count[b]``: pixels; ``confidence[b]``: their summed top-1
    probability; ``correct[b]``: how many of them the argmax got right."""

    bins: int = BINS
    count: Tensor = field(default=None)  # type: ignore[assignment]
    confidence: Tensor = field(default=None)  # type: ignore[assignment]
    correct: Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        for name in ("count", "confidence", "correct"):
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(self.bins, dtype=torch.float64))

    def update(self, probs: Tensor, target: Tensor, scored: Tensor | None = None,
               labels: Tensor | None = None) -> None:
        """Add one image.

        Args:
            probs: ``(C, H, W)`` probabilities (or ``(C, N)``: any shape after C).
            target: ``(H, W)`` class ids.
            scored: ``(H, W)`` bool, the pixels to count (e.g. the labelled ones); all if None.
            labels: ``(H, W)`` the predicted class ids; ``argmax(probs)`` if None (pass the
                engine's labels so confidence is scored against what was predicted).
        """
        top, arg = probs.float().max(dim=0)
        pred = arg if labels is None else labels.long()
        keep = torch.isfinite(top) if scored is None else scored & torch.isfinite(top)
        top, right = top[keep].double(), (pred[keep] == target[keep].long()).double()
        index = (top * self.bins).long().clamp(0, self.bins - 1)
        self.count += torch.bincount(index, minlength=self.bins).double()
        self.confidence += torch.bincount(index, weights=top, minlength=self.bins)
        self.correct += torch.bincount(index, weights=right, minlength=self.bins)

    def __iadd__(self, other: "ReliabilityBins") -> "ReliabilityBins":
        self.count += other.count
        self.confidence += other.confidence
        self.correct += other.correct
        return self

    def ece(self) -> float | None:
        """Expected calibration error in [0, 1]; None with no pixels."""
        total = float(self.count.sum())
        if total == 0:
            return None
        gap = (self.correct - self.confidence).abs()  # count * |accuracy - confidence| per bin
        return float(gap.sum() / total)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: the ECE and, per bin, its edges, pixels, mean confidence and accuracy."""
        rows = []
        for b in range(self.bins):
            n = float(self.count[b])
            rows.append({"lo": b / self.bins, "hi": (b + 1) / self.bins, "pixels": int(n),
                         "confidence": float(self.confidence[b] / n) if n else None,
                         "accuracy": float(self.correct[b] / n) if n else None})
        return {"ece": self.ece(), "bins": rows}


def scored_pixels(target: Tensor, in_mean: Sequence[bool]) -> Tensor:
    """``(H, W)`` bool: pixels whose truth is a class counted in the scores (ids outside
    the classes, e.g. 255 nodata, are not)."""
    counted = torch.tensor(list(in_mean) + [False] * (256 - len(in_mean)))
    return counted[target.long().clamp(0, 255)]


def calibration_summary(tempered: ReliabilityBins, raw: ReliabilityBins, temperature: float) -> dict[str, Any]:
    """A report's calibration entry: the temperature, the ECE with it and without (T = 1),
    and the reliability bins with it."""
    return {"temperature": temperature, "ece": tempered.ece(), "ece_uncalibrated": raw.ece(),
            "bins": tempered.to_dict()["bins"], "bins_uncalibrated": raw.to_dict()["bins"]}


def nll(logp: Tensor, target: Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of ``target`` under ``softmax(logp / T)``.

    Args:
        logp: ``(N, C)`` log-probabilities (float64 for a smooth search).
        target: ``(N,)`` class ids.
    """
    scaled = (logp / temperature).log_softmax(dim=1)
    return float(-scaled.gather(1, target[:, None]).mean())


def fit_temperature(probs: Tensor, target: Tensor, iterations: int = 60) -> float:
    """The temperature minimising the NLL of ``target`` under ``probs`` re-tempered.

    Golden-section search over ``log T`` in ``LOG_T_RANGE``: the NLL is convex in ``1 / T``,
    so unimodal in ``log T``; 60 steps narrow the range to about 1e-11 of its width.

    Args:
        probs: ``(N, C)`` probabilities of labelled pixels.
        target: ``(N,)`` their class ids.
    Returns:
        T (1.0 with no pixels).
    """
    if probs.shape[0] == 0:
        return 1.0
    # A probability of exactly 0 on the true class would make the NLL infinite at every T;
    # floor it at the smallest float32 normal, as a softmax in float32 would give.
    logp = probs.double().clamp_min(torch.finfo(torch.float32).tiny).log()
    target = target.long()
    lo, hi = LOG_T_RANGE
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(logp, target, math.exp(a)), nll(logp, target, math.exp(b))
    for _ in range(iterations):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(logp, target, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(logp, target, math.exp(b))
    return math.exp((lo + hi) / 2)


def sample_pixels(probs: Tensor, target: Tensor, scored: Tensor, limit: int,
                  generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """At most ``limit`` scored pixels of one image, drawn without replacement, for fitting.

    Args:
        probs: ``(C, H, W)``; target, scored: ``(H, W)``.
    Returns:
        ``(n, C)`` float32 probabilities and ``(n,)`` int64 class ids.
    """
    index = scored.flatten().nonzero()[:, 0]
    if index.numel() > limit:
        index = index[torch.randperm(index.numel(), generator=generator)[:limit]]
    flat = probs.float().flatten(1)
    return flat[:, index].T.contiguous(), target.flatten()[index].long()

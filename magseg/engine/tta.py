"""Test-time augmentation at the backbone call: every crop, at every stage, is run through
the backbone once per transform (flips, or the 8 flips and rotations of D4), each output
mapped back, and the probabilities averaged.

``TTABackbone`` wraps a backbone and keeps its contract (``(B, C_in, h, w)`` in, logits
out), so the stage loop, the crop counts and the streamed/in-memory equality are untouched:
it returns ``log(mean_t softmax(t^-1(backbone(t(x)))))``, whose softmax (what
``magseg.engine.stages.input_probs`` takes next) is that mean exactly. Around a backbone
that returns probabilities (a runtime's graph, ``gives_probabilities``) it returns the mean
itself, and says so too. The engine's crop counts stay the crops it ran; the backbone runs
``len(transforms)`` times per crop (``passes_per_crop``).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor, nn

from magseg.engine.backbone import gives_probabilities

TTA_MODES = ("none", "flip", "d4")

Transform = tuple[int, bool]  # (quarter turns, then a left-right flip)


def transforms(mode: str) -> list[Transform]:
    """The transforms of ``mode``: none 1, flip 2 (identity, left-right), d4 8."""
    if mode == "none":
        return [(0, False)]
    if mode == "flip":
        return [(0, False), (0, True)]
    if mode == "d4":
        return [(k, f) for k in range(4) for f in (False, True)]
    raise ValueError(f"engine.tta={mode!r}: choose one of {', '.join(TTA_MODES)}")


def forward(x: Tensor, t: Transform) -> Tensor:
    """``(..., h, w)`` rotated ``t[0]`` quarter turns, then flipped left-right if ``t[1]``."""
    k, flip = t
    y = torch.rot90(x, k, dims=(-2, -1)) if k else x
    return torch.flip(y, dims=(-1,)) if flip else y


def inverse(y: Tensor, t: Transform) -> Tensor:
    """Undo ``forward(., t)``: flip back, then turn back."""
    k, flip = t
    x = torch.flip(y, dims=(-1,)) if flip else y
    return torch.rot90(x, -k, dims=(-2, -1)) if k else x


class TTABackbone(nn.Module):
    """``backbone`` averaged over the transforms of ``mode`` (see the module's docstring).

    Forwards what ``magseg.engine.backbone`` reads off a backbone: ``context_ratios`` (a
    multi-context backbone's contexts are transformed with the crop),
    ``requires_divisible_input_shape`` and ``encoder.output_stride``.
    """

    def __init__(self, backbone: nn.Module, mode: str) -> None:
        super().__init__()
        self.inner = backbone
        self.mode = mode
        self.transforms = transforms(mode)
        if hasattr(backbone, "context_ratios"):
            self.context_ratios = tuple(backbone.context_ratios)
        # Probabilities in, their mean out (no log for the engine's softmax to undo).
        self.returns_probabilities = gives_probabilities(backbone)
        if getattr(backbone, "requires_divisible_input_shape", False):
            self.requires_divisible_input_shape = True
            stride = int(getattr(getattr(backbone, "encoder", None), "output_stride", 1))
            object.__setattr__(self, "encoder", SimpleNamespace(output_stride=stride))

    @property
    def passes_per_crop(self) -> int:
        return len(self.transforms)

    def forward(self, x: Tensor, contexts: list[Tensor] | None = None) -> Tensor:
        """``(B, C_in, h, w)`` -> ``(B, classes, h, w)`` float32 log of the mean probabilities
        (the mean itself where ``returns_probabilities``)."""
        layout = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous() else torch.contiguous_format
        total = None
        for t in self.transforms:
            xt = forward(x, t).contiguous(memory_format=layout)
            if contexts is None:
                out = self.inner(xt)
            else:
                out = self.inner(xt, [forward(c, t).contiguous(memory_format=layout) for c in contexts])
            if isinstance(out, (tuple, list)):
                out = out[0]
            out = out.float()
            probs = inverse(out if self.returns_probabilities else out.softmax(dim=1), t)
            total = probs if total is None else total + probs
        assert total is not None
        mean = total / len(self.transforms)
        if self.returns_probabilities:
            return mean
        # The log of a distribution: softmax gives the distribution back (the per-pixel
        # log-sum-exp is log 1 = 0). A probability of 0 would be -inf; the floor keeps it finite.
        return mean.clamp_min(torch.finfo(torch.float32).tiny).log()


def with_tta(backbone: nn.Module, mode: str) -> nn.Module:
    """``backbone`` itself for ``none``, else a ``TTABackbone`` around it."""
    if mode == "none":
        return backbone
    return TTABackbone(backbone, mode)


def passes_per_crop(mode: str) -> int:
    """Backbone runs per crop under ``engine.tta = mode``."""
    return len(transforms(mode))


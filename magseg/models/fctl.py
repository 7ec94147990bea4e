"""FCtL (Li et al., ICCV 2021): a local crop segmented with features of larger context crops.

    local crop  ─┐                       ┌─ self-correlation (local -> local)
    context x2  ─┼─ shared encoder ─ f ──┼─ contextual correlation (local -> context x2)
    context x3  ─┘   (one batch)         └─ contextual correlation (local -> context x3)
                                                 │ per-pixel fusion weights (softmax over branches)
                     f_local + gate(fused) ──────┘──▶ the smp decoder ──▶ logits of the local crop

Every crop (local and contexts) is resized to the same input size, so a context's deepest
feature map has the local map's shape but covers ``ratio`` times its extent. Correlation is
*locality-aware*: each local feature attends only to the ``window x window`` context features
around its own position in the context map (windowed attention on the deepest features,
where a 512 px input gives a 16 x 16 map). The gate is a zero-initialised 1x1 convolution,
so an untrained FCtL is exactly its smp model on the local crop.

The engine feeds ``forward(x, contexts)``; it learns which context ratios to cut from the
``context_ratios`` attribute (see ``magseg.engine.pyramid.context_windows``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magseg.config import ModelConfig
from magseg.errors import ModelError
from magseg.models.smp import create_backbone

# model.kwargs keys FCtL takes for itself; the rest go to the smp decoder architecture.
_FCTL_KEYS = ("decoder", "contexts", "key_channels", "window")


def aligned_windows(features: Tensor, ratio: float, window: int) -> Tensor:
    """For each local position, the ``window x window`` neighbourhood of its position in a
    context feature map that covers ``ratio`` times the local extent (same centre).

    Args:
        features: ``(B, D, h, w)`` context features.
    Returns:
        ``(B, D, window * window, h, w)``: entry ``[:, :, j, y, x]`` is the j-th neighbour
        (row-major) of the context cell under local cell ``(y, x)``.
    """
    b, d, h, w = features.shape
    pad = window // 2
    # Every k x k neighbourhood in the context's own grid, as channels: (B, D*k*k, h, w).
    neigh = F.unfold(features, window, padding=pad).view(b, d * window * window, h, w)
    if ratio != 1:
        # Local cell centre u in (0, 1) sits at 0.5 + (u - 0.5) / ratio of the context map;
        # take the neighbourhood of the context cell it falls in (nearest).
        ys = 0.5 + ((torch.arange(h, device=features.device) + 0.5) / h - 0.5) / ratio
        xs = 0.5 + ((torch.arange(w, device=features.device) + 0.5) / w - 0.5) / ratio
        rows = (ys * h).floor().long().clamp(0, h - 1)
        cols = (xs * w).floor().long().clamp(0, w - 1)
        neigh = neigh[:, :, rows][:, :, :, cols]
    return neigh.view(b, d, window * window, h, w)


class Correlation(nn.Module):
    """Windowed attention from local queries to one source's keys/values: ``(B, D, h, w)``."""

    def __init__(self, channels: int, key_channels: int, window: int, ratio: float) -> None:
        super().__init__()
        self.window, self.ratio = window, ratio
        self.query = nn.Conv2d(channels, key_channels, 1)
        self.key = nn.Conv2d(channels, key_channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.scale = 1 / math.sqrt(key_channels)

    def forward(self, local: Tensor, source: Tensor) -> Tensor:
        q = self.query(local).unsqueeze(2)  # (B, Dk, 1, h, w)
        k = aligned_windows(self.key(source), self.ratio, self.window)  # (B, Dk, kk, h, w)
        v = aligned_windows(self.value(source), self.ratio, self.window)  # (B, D, kk, h, w)
        attn = ((q * k).sum(1, keepdim=True) * self.scale).softmax(dim=2)  # (B, 1, kk, h, w)
        return (attn * v).sum(2)


class MultiContextFusion(nn.Module):
    """Self- and contextual correlations fused with learned per-pixel weights, added to the
    local features through a zero-initialised gate."""

    def __init__(self, channels: int, ratios: Sequence[float], key_channels: int = 64, window: int = 3) -> None:
        super().__init__()
        self.ratios = tuple(ratios)
        self.branches = nn.ModuleList(
            [Correlation(channels, key_channels, window, 1.0)]
            + [Correlation(channels, key_channels, window, r) for r in self.ratios]
        )
        n = len(self.branches)
        self.weights = nn.Conv2d(channels * (n + 1), n, 1)
        self.gate = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, local: Tensor, contexts: Sequence[Tensor]) -> Tensor:
        """``local`` ``(B, D, h, w)`` and one ``(B, D, h, w)`` map per ratio -> ``(B, D, h, w)``."""
        if len(contexts) != len(self.ratios):
            raise ValueError(f"expected {len(self.ratios)} context maps, got {len(contexts)}")
        outs = [self.branches[0](local, local)]
        outs += [branch(local, ctx) for branch, ctx in zip(self.branches[1:], contexts)]
        weights = self.weights(torch.cat([local, *outs], dim=1)).softmax(dim=1)  # (B, n, h, w)
        fused = sum(weights[:, i : i + 1] * o for i, o in enumerate(outs))
        return local + self.gate(fused)


class FCtL(nn.Module):
    """An smp encoder-decoder whose deepest local features are fused with context features.

    ``forward(x, contexts)``: ``x`` ``(B, C_in, h, w)`` the local crops, ``contexts`` one
    ``(B, C_in, h, w)`` batch per ratio in ``context_ratios`` -> ``(B, classes, h, w)`` logits.
    """

    requires_divisible_input_shape = True

    def __init__(self, base: nn.Module, ratios: Sequence[float], key_channels: int = 64, window: int = 3) -> None:
        super().__init__()
        self.encoder = base.encoder
        self.decoder = base.decoder
        self.segmentation_head = base.segmentation_head
        self.context_ratios = tuple(float(r) for r in ratios)
        self.fusion = MultiContextFusion(self.encoder.out_channels[-1], self.context_ratios, key_channels, window)

    def forward(self, x: Tensor, contexts: Sequence[Tensor]) -> Tensor:
        if len(contexts) != len(self.context_ratios):
            raise ValueError(
                f"FCtL takes {len(self.context_ratios)} context batches (ratios {self.context_ratios}), "
                f"got {len(contexts)}"
            )
        b = x.shape[0]
        # One encoder pass over local and context crops together (shared weights, one batch).
        features = self.encoder(torch.cat([x, *contexts], dim=0))
        deepest = features[-1].split(b, dim=0)
        local_features = [f[:b] for f in features]
        local_features[-1] = self.fusion(deepest[0], deepest[1:])
        return self.segmentation_head(self.decoder(local_features))


def create_fctl(model: ModelConfig, classes: int) -> FCtL:
    """FCtL from ``model`` (``arch: fctl``); ``model.kwargs``: ``decoder`` (an smp
    architecture, default Unet), ``contexts`` (ratios, default [2, 3]), ``key_channels``,
    ``window``; other kwargs go to the decoder architecture."""
    kwargs = dict(model.kwargs)
    decoder = kwargs.pop("decoder", "Unet")
    ratios = kwargs.pop("contexts", [2, 3])
    key_channels = int(kwargs.pop("key_channels", 64))
    window = int(kwargs.pop("window", 3))
    if decoder.lower() == "fctl":
        raise ModelError("model.kwargs.decoder must be an smp architecture (e.g. Unet, FPN), not fctl")
    if not ratios or any(float(r) < 1 for r in ratios):
        raise ModelError(f"model.kwargs.contexts must be ratios >= 1 (e.g. [2, 3]), got {ratios}")
    if window < 1 or window % 2 == 0:
        raise ModelError(f"model.kwargs.window must be odd and >= 1, got {window}")
    base = create_backbone(dataclasses.replace(model, arch=decoder, kwargs=kwargs), classes)
    return FCtL(base, ratios, key_channels, window)

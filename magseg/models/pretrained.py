"""Pretrained encoder weights available without a network.

A registry from ``(encoder, weights)`` to a loader that maps weights shipped inside an
installed package onto smp's encoder. ``create_backbone`` consults it before asking smp to
download anything.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

# (encoder name, weights name) -> loader(model, in_channels)
OFFLINE_WEIGHTS: dict[tuple[str, str], Callable[[nn.Module, int], None]] = {}


def has_offline_weights(encoder: str, weights: str) -> bool:
    return (encoder, weights) in OFFLINE_WEIGHTS


def load_offline_weights(model: nn.Module, encoder: str, weights: str, in_channels: int) -> None:
    OFFLINE_WEIGHTS[(encoder, weights)](model, in_channels)
